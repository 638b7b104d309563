"""Benchmarks: real HAProxy (``send-proxy-v2``) in front of pymmproxy, go-mmproxy, HAProxy
as the receiver, and no proxy at all, inside network namespaces made for the run.

``python -m benchmarks.run [--quick] [--out DIR] [--only NAMES]`` (see ``benchmarks/README.md``).
"""
