"""A1111 / Forge / reForge adapter of cfg-distill: the webui-specific logic behind scripts/.

The webui loads scripts/*.py with this extension's folder on sys.path, so they import this package
and the host-free core (`cfg_distill`) as top-level packages. Nothing here imports the webui's
`modules`: the scripts read the webui's objects and hand them over.
"""
