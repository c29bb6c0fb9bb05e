"""A functions module whose second importer waits for a gate file: one ``--workers`` worker is
ready while another is still loading, for as long as a test wants.

``GRADSERVE_TEST_GATE`` names a directory: the first process to import takes ``first`` in it
and goes on; every later one waits (up to 60 s) until ``open`` exists there.
"""

import os
import time

import gradserve_test_functions  # noqa: F401  (the Functions to serve)

_gate = os.environ["GRADSERVE_TEST_GATE"]
try:
    os.close(os.open(os.path.join(_gate, "first"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
except FileExistsError:
    _give_up = time.monotonic() + 60
    while not os.path.exists(os.path.join(_gate, "open")) and time.monotonic() < _give_up:
        time.sleep(0.02)
