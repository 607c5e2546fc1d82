"""syncmesh-plugin: a Docker volume plugin that keeps volumes identical across hosts in real time."""

__version__ = "0.1.0"
