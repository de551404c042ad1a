"""Peer servers for `python -m loadtests.peers`: each runs in its own virtual environment
and imports nothing of this project's but `service.app.ready` (its ready line)."""
