"""edgekit.devices: discovery of this host and attached devices, verified pushes of artifacts."""
