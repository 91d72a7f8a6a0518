"""vmstream: virtual memory streaming for virtual machines.

Layers, each a package, calling only downwards:

    cli -> host (agent, REST API) -> qemu, capture, image, guest -> config, errors
"""

__version__ = "0.1.0"
