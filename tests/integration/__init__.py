"""Integration suite: a real server, over the network (see conftest.py for where)."""
