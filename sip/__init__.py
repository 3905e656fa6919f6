"""The SIP user agent: the only package that imports pjsua2.

One ``Engine`` owns one pjsua2 Endpoint in one thread. It turns pjsua2
callbacks into plain dataclass events (``sip.events``) and takes commands
(``sip.commands``) from a queue, so nothing else ever touches pjsua2.
"""
