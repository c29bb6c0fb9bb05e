"""A functions module that takes a while to import, so the loading health state can be observed."""

import time

time.sleep(1.5)
