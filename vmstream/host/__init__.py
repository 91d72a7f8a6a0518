"""The host agent: owns this host's VMs and live images, serves the REST API."""
