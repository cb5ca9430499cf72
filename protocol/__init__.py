"""The contract both parties share.

Pipeline of one crossing: the sender serialises model artifacts (``artifact``), signs a statement
of every file and tensor hash (``signing``), seals the bundle to its recipient (``sealing``), checks
it with the egress guard (owner side, ``egress``) and records it in the audit log (``audit``). The
recipient opens, verifies the signature and hashes on the raw bytes, and only then parses
(``verifying``). No torch training code lives here.

Modules (one per verb, private helpers underscored; each lists its public names in ``__all__``):

* ``contract``: the contract itself, defined once: the signed kinds, the Flower message types,
  every bundle file name, and the two bundles as frozen types: ``ModelRequest`` (built by the
  owner, read by the entity through ``from_files``) and ``PruneResult`` (built by the entity, read
  by the owner through ``from_files``, which runs every tensor, mask, report and recipe check).
* ``errors``: ``ProtocolError`` and one subclass per refusal (``KeyFileError``, ``SignatureError``,
  ``SealError``, ``AdmissionError``, ``ReplayError``, ``RequestError``, ``ArtifactError``,
  ``MaskError``, ``EgressViolation``, ``AuditError``; ``spec.SpecError`` and
  ``canonical.CanonicalJSONError`` are ProtocolErrors too); ``str(e)`` is one line.
* ``graph_ops``: the allow-list of ATen compute ops and the checks a received graph passes before
  torch deserializes it; ``artifact`` rebuilds graphs and tensors without unpickling anything.
* ``cli``: the one CLI boundary (``run_cli``, ``fatal``): one escaped error line, exit codes.
* ``display``: ``printable``, the other party's text with every hidden character made visible.
* ``keys``: ``IdentityCard``, ``Identity``, ``init_identity``, ``load_identity``, ``load_card``,
  ``load_registry``, ``register_card``, ``admit``; CLI ``python -m protocol.keys
  init|show|register``. Cards with small-order (forgeable) keys are refused.
* ``signing``: ``sign_message`` / ``verify_message`` (DSSE over canonical JSON), ``digest``
  (``"sha256:<hex>"``, used for request hashes), in-toto statements of bundles.
* ``sealing``: ``seal_bundle`` (and ``seal_bundle_detailed``, which also returns the signed
  statement for the audit log), ``open_bundle`` -> ``OpenedBundle``, ``sender_fingerprint``,
  ``peek_header``. ``verifying`` holds the statement checks ``open_bundle`` runs.
* ``masks``: ``pack_masks`` / ``unpack_masks`` (bit-packed, canonical, bool tensors out).
* ``replay``: ``NonceStore`` (``issue`` / ``redeem`` on the entity, ``accept_once`` on the owner),
  ``new_job_id``, ``new_nonce``.
* ``egress``: ``EgressGuard(schema, max_bytes, ...)``, ``.check(files, claims)``, ``schema_of``,
  ``redact_counters`` / ``DATA_COUNTERS`` (BatchNorm batch counters reveal the training-set size).
  ``program_guard``: ``strip_program`` (drop the stack traces and module paths torch.export
  records) and ``check_program`` (the guard's default check of ``program.json``).
* ``tensors``: ``schema_of``, ``check_safetensors`` (exact schema, finite, no metadata, canonical
  bytes) and ``check_masks`` for what the owner receives.
* ``audit``: ``AuditLog.open/append/checkpoint/record_sent/record_received/record_blocked/
  record_refused/record_countersignature/record_receipt``, ``countersign_checkpoint``,
  ``make_receipt``, ``verify_log`` -> ``AuditVerdict``, ``read_records``, ``embedded_cards``.
  CLI: ``python -m owner.audit verify|report``.
* ``transport``: key material for the Flower TLS and SuperNode-auth deployment options.

Differences from the first API sketch: ``open_bundle`` also takes ``max_bytes``;
``seal_bundle_detailed`` returns the signed statement with the blob (for ``record_sent``);
``verify_log`` takes one entity card or a fingerprint -> card mapping, an optional external
``checkpoint`` (detects truncation below it),
``every_signature`` (False: the owner signature of the last checkpoint only) and
``allow_unanchored`` (a log without a signed checkpoint fails unless this names the weaker check); ``NonceStore``
(``replay``) gives the replay primitives; ``AuditLog`` has ``record_*`` helpers so the flow logs
each step in one call. ``protocol/FLOW.md`` lists the calls each side makes, in order.
"""
