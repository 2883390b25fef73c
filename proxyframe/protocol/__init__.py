"""
The proxy's Twisted protocols: the client side (:mod:`.server`), the
upstream side and its pool (:mod:`.upstream`), and CONNECT tunnels
(:mod:`.tunnel`).
"""
