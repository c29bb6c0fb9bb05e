"""gradserve wire contract, version 1: stubs generated from ``gradserve.proto``.

Regenerate with ``python scripts/gen_protos.py``; never edit the ``*_pb2*`` files by hand.
"""
