"""Deployment: the local process stack (``mmrank stack``), the load-test runner
(``mmrank loadtest``) and the configuration files the compose stack mounts
(``prometheus.yml``). Imports nothing from ``service`` at module level."""
