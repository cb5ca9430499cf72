"""The contract both parties share.

Pipeline of one crossing: the sender serialises model artifacts (``artifact``), signs a statement
of every file and tensor hash (``signing``), seals the bundle to its recipient (``sealing``), checks
it with the egress guard (owner side, ``egress``) and records it in the audit log (``audit``). The
recipient opens, verifies the signature and hashes on the raw bytes, and only then parses
(``verifying``). No torch training code lives here.
"""
