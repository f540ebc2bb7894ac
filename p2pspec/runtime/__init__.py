"""The runtime above the network: the drafter's scheduler, the Python client, logging.
The peers' roles (`p2pspec.peers`) belong to this layer too."""
