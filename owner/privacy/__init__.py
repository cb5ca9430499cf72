"""Membership-inference audit of the owner's own models (``python -m owner.privacy audit``).

The audit trail proves which artifacts left the owner's machine; it cannot say how much the
weights themselves reveal about the training images. This package measures that, on the owner's
machine only: it trains reference models on disjoint subsets of the owner's training split, runs
the standard black-box attacks against the dense model, the pruned model as received and the final
model (members: images of the training split; non-members: the held-out split), and writes the
results into the owner's audit trail as a local-only event, where ``owner.audit report`` shows them.

Pipeline: ``auditing.prepare`` splits the data and loads the models, ``auditing.run_audit`` trains
the reference models and collects each model's logits, ``attacks`` turns logits into attack scores
and scores into metrics with bootstrap intervals (pure numpy, no torch), ``auditing.record`` writes
the ROC plot, the result file and the audit event. The CLI (``__main__``) is the only part that
shows progress with rich.

Our own module rather than sacroml or privacy-meter: both bring a heavy stack the owner does not
otherwise need (sacroml: scikit-learn, pandas and its own model wrappers for trusted research
environments; privacy-meter 1.0.1: an unmaintained 2023 release with its own training loop and
pinned dependencies), while the four attacks are each a few lines over the logits we already
compute. Each follows its paper (cited where it is defined) and the metric code is tested against
closed-form values.
"""
