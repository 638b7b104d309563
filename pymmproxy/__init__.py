"""pymmproxy: a PROXY-protocol transparent proxy with native policy-routing pathways."""

__version__ = "0.1.0"
