"""The network: the one libp2p adapter (node, and the inbound limits of its transport),
conversations on a stream (channel), the directory exchange (discovery), round-trip
probes (prober), and the trio actor helpers these services and the runtime run on."""
