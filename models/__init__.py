"""PyTorch definitions of the CameNN and EM3 item towers and rankers, and the
baselines they are compared with. Training-side only: the service never imports it."""
