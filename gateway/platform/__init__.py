"""The push to the central 好差评 platform (SPEC R7.1-R7.3, ``PLATFORM.md`` contract v1).

- :mod:`gateway.platform.records`: the one mapping from the store to the platform's format, and
  the request signature (pure);
- :mod:`gateway.platform.policy`: what to do with each answer: acknowledge, set aside, split,
  back off (pure);
- :mod:`gateway.platform.pusher`: the Twisted service that claims outbox rows and posts them;
- :mod:`gateway.platform.reconcile`: daily totals, the gateway's and the platform's side by side.
"""
