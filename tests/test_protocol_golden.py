"""Golden vectors: the wire formats are stable, and our Merkle tree is RFC 9162's.

The identities come from fixed seeds; Ed25519 signatures are deterministic, so a signed message
and a packed mask must reproduce byte for byte. HPKE is randomised, so the sealed bundle and the
audit log are golden *inputs*: bytes written by this version that every later version must still
open and verify. If a format change is intended, regenerate the constants and say so in the commit.
"""
from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import torch
from safetensors.torch import load

from protocol._merkle import root_of
from protocol.audit import verify_log
from protocol.keys import Identity
from protocol.masks import pack_masks, unpack_masks
from protocol.sealing import open_bundle
from protocol.signing import digest, sign_message, verify_message


def _ident(role: str, name: str, tag: bytes) -> Identity:
    return Identity.from_private_bytes(role, name, hashlib.sha256(tag + b"sign").digest(), hashlib.sha256(tag + b"seal").digest())


OWNER = _ident("owner", "golden-owner", b"owner")
ENTITY = _ident("entity", "golden-entity", b"entity")

OWNER_FP = "1f59b9978485c5c7ab82ac77a38082f3ab445e54666758a7faa30536c2ac7f2b"
ENTITY_FP = "d2a0aec9ece4ed23777b67a980ca1a9727275471c3cf96e614d7137fd53eb8d9"
MESSAGE = (
    "{\"payload\":\"eyJib2R5Ijp7ImpvYl9pZCI6ImpvYi1nb2xkZW4iLCJuIjo3LCJub25jZSI6IjAwMDAwMDAwMDAwMDAwMDAw"
    "MDAwMDAwMDAwMDAwMDAwIn0sImtpbmQiOiJvZmZlciIsInNpZ25lciI6ImQyYTBhZWM5ZWNlNGVkMjM3NzdiNjdhOTgwY2Ex"
    "YTk3MjcyNzU0NzFjM2NmOTZlNjE0ZDcxMzdmZDUzZWI4ZDkiLCJ0eXBlIjoiYmxpbmRwcnVuZS9tZXNzYWdlL3YxIn0=\",\"p"
    "ayloadType\":\"application/vnd.blindprune.message+json\",\"signatures\":[{\"keyid\":\"d2a0aec9ece4ed2377"
    "7b67a980ca1a9727275471c3cf96e614d7137fd53eb8d9\",\"sig\":\"7iWhtlXKbmkaycrD/0CPbpVgzeR1QoLQLD5VvKmX0"
    "R+3sWRIV8JInj7FC2ZQ/ARdHRMbDA/6ZNqfxglekRthBg==\"}]}"
)
MASK_HEX = (
    "42504d41534b310a000000747b2274656e736f7273223a5b7b226e616d65223a22612e776569676874222c226e627974"
    "6573223a312c226f6666736574223a302c227368617065223a5b322c335d7d2c7b226e616d65223a2262222c226e6279"
    "746573223a322c226f6666736574223a312c227368617065223a5b395d7d5d7dacff80"
)
SEALED_B64 = (
    "QlBTRUFMMQoAAAFceyJqb2JfaWQiOiJqb2ItZ29sZGVuIiwia2luZCI6Im1vZGVsIiwicmVjaXBpZW50IjoiZDJhMGFlYzll"
    "Y2U0ZWQyMzc3N2I2N2E5ODBjYTFhOTcyNzI3NTQ3MWMzY2Y5NmU2MTRkNzEzN2ZkNTNlYjhkOSIsInJlcXVlc3RfaGFzaCI6"
    "InNoYTI1NjpkODI0ODUyNWJjZmFmYjY3NTkyNzM1MTI1NjAwNmRiNjAzOWZiOGQzZDU3ODI1NWNlNzdjNzFiZTNiZDU5NTc1"
    "Iiwic2VuZGVyIjoiMWY1OWI5OTc4NDg1YzVjN2FiODJhYzc3YTM4MDgyZjNhYjQ0NWU1NDY2Njc1OGE3ZmFhMzA1MzZjMmFj"
    "N2YyYiIsInN1aXRlIjoiREhLRU0oWDI1NTE5LEhLREYtU0hBMjU2KS9IS0RGLVNIQTI1Ni9BRVMtMjU2LUdDTSIsInYiOjF9"
    "vNO1QWjVgBNM/eetQCtMoiOEbI9F54gIebl/YIU3oXMlD/OPVVzWUq3UhqiH/gm4GRLT7T/Cc1Y4Qqgl2nsiThZSLOeB+r9+"
    "+IBxPJjBqKhlc4OOJPFPr0ikKapQlBjVHDxfQEEFb5AHkd+Cykxxkp3nnOKIj9L6BzJpng2qsSyQOCEOGFdEIrZvGhyC3jSQ"
    "yoTzACmRo2COEsXi4XTBxuAqAPqN0X0DHFL45J6Ev7EtUF8iRM0qrdF//075dWqe4LLfCLNg+TQQDP8COU1+ja1gAtb7PtDV"
    "NcMvv1L4JsgLkall+SESHB6dc4qwD6Q/rwmhrOa99JysgzwooUdi33sIDpJtItP6Ul9pSx30fHOF4yasqmBA1S1bquLgA8aM"
    "kpbaJHbhT2eyWk/Ft2Wb3RWnBuVYCnPtmoKCVPnvFTOp294tpkEQr1M2/7gFedRXRthpNE4TeZ6ii4GXkwwgJwYmhbDBvl6I"
    "UOghc+GikIJBxdqOh5uSEhO5U9iN+QoClEmsYnuxoIZ1PCv+vr7Vj75HMgQSOchrp6GXwAqsNNGkGaRgQAqMtjoaPNdnHVTY"
    "Lnjl5IORdCMDUe5d7leA0zZTQoBawY2KUAH1TB/OCgjjDoBuul4PXTE5++T5mdjGjuYxxtUhz0TVTaeWuCbpCzy8XeoSTub8"
    "KBa4Et9wYJ9LJvXN5sbJytuMTbSk7rMBi60PW7iGy2dT0DAMH6SddEsrnwyHKH+JR6gJijdPoRLY4Oex9UpI82Fe1suF2O6L"
    "/NrPKAfCt9+4Q1cMwqcxUigYW2wVjVQQazEKRXzzi0QBo2RIx2P/94itfM2HdRyChWlHPGZILH4afaWxuBHtudZPUfSqqHts"
    "1OY70a0ZuBJEu/Z5XN3wJqDhGvYRq/15RAdnlQty1iAo8vVYH1QPeCenkBJqkEe2544m5tCg6QB7r7dmkC2/ALoYoI2MeDQz"
    "1k3tO32kFqbfJz+nLFRL8juoIF2zEYCCztgFfK6n5/wDVaOW3ztXLJrtRrO2GVh9OIHffSOEuATVWul7nq13ucq92ZYKC9vg"
    "CT/DmrVhBXLUWJqMlwHvv0HgDFY4CC25h5laKXGtDeDIAMHQoHj/uVWuL0QuQb9HMd6wmObVg2qeaLV7FsQ2WZhzEqiWgcwP"
    "1LLTCfg3jDPeqt6wsIEC8ey4LcIaJLqR6bsd9a9Hf4pHRqSGETSSn3nvab67p/2x30q4EjpotKWLA3CamzlLy8afmW+Wx1eE"
    "QNEoM5dm/e082RqZXo1HSCv6nNk63l+YaS+gj0gPcYYPx/kRMmhl39QW2/n47vPF82YZjqirEYuJTLInWV99bFN/uqkyXuRu"
    "d/mWPR5jM+QBJsObO7sVC6qFoNzQcMgQtsBBMW47Lm0v3f/y2ku+hFGUqYXV6p0BypMM00IQI7yP53kmqaRFGiCBOlOs450R"
    "tXLy8v3/rVJ9maRHqGt/AqmS9DicGDEwYj9rQJbIA+Mx+9OhSUleG/X9/yLbhsfi5L0bMySfQeXYj0kiWjq4newxJAT1WD8x"
    "opTVqPlH4Jn4SwHvlITn6Taaex+4vit6Ofhpo4aIrwFQW21IMB6YtQsLBQxzMf+oWTX0vmmkwlEuO5zuDkGpSnjGk7O2g0kQ"
    "0TIRSwwWptbM8JROzmMKi4yfY5yDsy+vHV7lDA7OcZ92Juuh86mR2AlezHdgTFpXPheKACgpeK7ih0wMwfdRiswlRSII55O2"
    "HXnO6DUPzVOwJXkzLY33zSLZChEmCAI+MB8BOzdRPgCWdr/ToAx958y+8+rOdYrK7Sq+b7I5ZbUIGs0PMK/iE7/Uzakd7N/q"
    "kKPeFZGbO4lQaWTxgnKtnZKGg6w4C3HhSINkiaXgVbR/AuA6M1ryj75iMbOQChqAVJERkEqpf4MglPAwr3lSevrvJve3018L"
    "/3p4LoigB8ZeNG/hciOf4Attvu2NKyxlynE/8rWFTqaV3PdSAWQGWX4ZI4+SesxW7vJhWHpXbO+wRZxcJxk+igSBD6L7ofIb"
    "FyJ/JHFb5fqYGSvsARkOdKMivbJjhQ=="
)
LOG_B64 = (
    "eyJkZXRhaWxzIjp7ImxvZ19pZCI6ImxvZy1lMzk2MDQ5OGQ1MjI1ZDdiYzZiNzk4OWUiLCJvd25lciI6IjFmNTliOTk3ODQ4"
    "NWM1YzdhYjgyYWM3N2EzODA4MmYzYWI0NDVlNTQ2NjY3NThhN2ZhYTMwNTM2YzJhYzdmMmIiLCJvd25lcl9jYXJkIjp7ImZp"
    "bmdlcnByaW50IjoiMWY1OWI5OTc4NDg1YzVjN2FiODJhYzc3YTM4MDgyZjNhYjQ0NWU1NDY2Njc1OGE3ZmFhMzA1MzZjMmFj"
    "N2YyYiIsIm5hbWUiOiJnb2xkZW4tb3duZXIiLCJyb2xlIjoib3duZXIiLCJzZWFsaW5nX3B1YmxpYyI6InpOVnVMWjFTMU9G"
    "NG1JYldENFdSMFRvK0hSdi9JRDJCeHFWWXRUc1pRalE9Iiwic2lnbmluZ19wdWJsaWMiOiJUeUdETmh2dHRNVWl4SDZTeUQ5"
    "dCtURzl1dk10RlQrTzdwdVVHblQxNlNZPSIsInR5cGUiOiJibGluZHBydW5lL2lkZW50aXR5LWNhcmQvdjEifSwib3duZXJf"
    "bmFtZSI6ImdvbGRlbi1vd25lciJ9LCJldmVudCI6ImxvZy5jcmVhdGVkIiwicHJldiI6InNoYTI1NjowMDAwMDAwMDAwMDAw"
    "MDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwIiwic2VxIjowLCJ0aW1lIjoiMjAy"
    "Ni0xMS0yMVQwNzozODoyN1oifQp7ImRldGFpbHMiOnsiam9iX2lkIjoiam9iLWdvbGRlbiJ9LCJldmVudCI6ImpvYi5zdGFy"
    "dGVkIiwicHJldiI6InNoYTI1Njo1MzliMjFjN2U4M2VlMzMwMjIzZjk3MDdlYzk2OTcwODc2YmViN2ZmZGZhOTYzODhhZDhl"
    "Y2FhMGViNWZlMWY0Iiwic2VxIjoxLCJ0aW1lIjoiMjAyNi0xMS0yMVQwNzozODoyN1oifQp7ImRldGFpbHMiOnsiY2hlY2tw"
    "b2ludCI6eyJwYXlsb2FkIjoiZXlKaWIyUjVJanA3SW14aGMzUmZjbVZqYjNKa0lqb2ljMmhoTWpVMk9tRmhPR0V4WXpsbU9H"
    "WXhNVEl4TW1NeU1UVmpNVGcyWm1Fd05UQTVaVEpqTm1FNE1XSTRNR0UyWW1NMFkyTXhZVFpoTldabE1ETXdZMkprTnpRek0y"
    "WWlMQ0pzYjJkZmFXUWlPaUpzYjJjdFpUTTVOakEwT1Roa05USXlOV1EzWW1NMllqYzVPRGxsSWl3aWNtOXZkRjlvWVhOb0lq"
    "b2ljMmhoTWpVMk9qQTBNRGc1WldGa05USm1ZalUwWldFNE1HTXdZVEV3TVRGa1l6ZGpOMkZoTldFd1l6UmhOVEl6WkRBek1t"
    "WmxZemMxTTJZMVpEQXpNVGxqTWpWaU5UVWlMQ0owYVcxbElqb2lNakF5TmkweE1TMHlNVlF3Tnpvek9Eb3lOMW9pTENKMGNt"
    "VmxYM05wZW1VaU9qSjlMQ0pyYVc1a0lqb2lZWFZrYVhRdFkyaGxZMnR3YjJsdWRDSXNJbk5wWjI1bGNpSTZJakZtTlRsaU9U"
    "azNPRFE0TldNMVl6ZGhZamd5WVdNM04yRXpPREE0TW1ZellXSTBORFZsTlRRMk5qWTNOVGhoTjJaaFlUTXdOVE0yWXpKaFl6"
    "ZG1NbUlpTENKMGVYQmxJam9pWW14cGJtUndjblZ1WlM5dFpYTnpZV2RsTDNZeEluMD0iLCJwYXlsb2FkVHlwZSI6ImFwcGxp"
    "Y2F0aW9uL3ZuZC5ibGluZHBydW5lLm1lc3NhZ2UranNvbiIsInNpZ25hdHVyZXMiOlt7ImtleWlkIjoiMWY1OWI5OTc4NDg1"
    "YzVjN2FiODJhYzc3YTM4MDgyZjNhYjQ0NWU1NDY2Njc1OGE3ZmFhMzA1MzZjMmFjN2YyYiIsInNpZyI6InVHMUsvM0toRzZI"
    "bDZUREFjeDA1TjNmaHhCY3JCZi9hYWoweWk0OTRodk5QaUU5a0VUbkxNcENIczFNZHd0d2FoRWE2R1lMODJqazdHZDdQZ0FG"
    "RUR3PT0ifV19fSwiZXZlbnQiOiJjaGVja3BvaW50IiwicHJldiI6InNoYTI1NjphYThhMWM5ZjhmMTEyMTJjMjE1YzE4NmZh"
    "MDUwOWUyYzZhODFiODBhNmJjNGNjMWE2YTVmZTAzMGNiZDc0MzNmIiwic2VxIjoyLCJ0aW1lIjoiMjAyNi0xMS0yMVQwNzoz"
    "ODoyN1oifQp7ImRldGFpbHMiOnsiY291bnRlcnNpZ25hdHVyZSI6eyJwYXlsb2FkIjoiZXlKaWIyUjVJanA3SW1Ob1pXTnJj"
    "RzlwYm5RaU9pSnphR0V5TlRZNk1qUmtPV1V3TW1SbU1HSmxNbUkyWXpsaE5qUTBPV1ZpTnpVeVlqQmpOV1UyTURNMVkyVTJP"
    "RFUyTldJek9XVXhabU5rWXpneVl6SXdZbUl3WlRBeE5TSXNJbVZ1ZEdsMGVTSTZJbVF5WVRCaFpXTTVaV05sTkdWa01qTTNO"
    "emRpTmpkaE9UZ3dZMkV4WVRrM01qY3lOelUwTnpGak0yTm1PVFpsTmpFMFpEY3hNemRtWkRVelpXSTRaRGtpTENKc2IyZGZh"
    "V1FpT2lKc2IyY3RaVE01TmpBME9UaGtOVEl5TldRM1ltTTJZamM1T0RsbElpd2liM2R1WlhJaU9pSXhaalU1WWprNU56ZzBP"
    "RFZqTldNM1lXSTRNbUZqTnpkaE16Z3dPREptTTJGaU5EUTFaVFUwTmpZMk56VTRZVGRtWVdFek1EVXpObU15WVdNM1pqSmlJ"
    "aXdpY205dmRGOW9ZWE5vSWpvaWMyaGhNalUyT2pBME1EZzVaV0ZrTlRKbVlqVTBaV0U0TUdNd1lURXdNVEZrWXpkak4yRmhO"
    "V0V3WXpSaE5USXpaREF6TW1abFl6YzFNMlkxWkRBek1UbGpNalZpTlRVaUxDSjBhVzFsSWpvaU1qQXlOaTB4TVMweU1WUXdO"
    "em96T0RveU4xb2lMQ0owY21WbFgzTnBlbVVpT2pKOUxDSnJhVzVrSWpvaVlYVmthWFF0WTI5MWJuUmxjbk5wWjI1aGRIVnla"
    "U0lzSW5OcFoyNWxjaUk2SW1ReVlUQmhaV001WldObE5HVmtNak0zTnpkaU5qZGhPVGd3WTJFeFlUazNNamN5TnpVME56RmpN"
    "Mk5tT1RabE5qRTBaRGN4TXpkbVpEVXpaV0k0WkRraUxDSjBlWEJsSWpvaVlteHBibVJ3Y25WdVpTOXRaWE56WVdkbEwzWXhJ"
    "bjA9IiwicGF5bG9hZFR5cGUiOiJhcHBsaWNhdGlvbi92bmQuYmxpbmRwcnVuZS5tZXNzYWdlK2pzb24iLCJzaWduYXR1cmVz"
    "IjpbeyJrZXlpZCI6ImQyYTBhZWM5ZWNlNGVkMjM3NzdiNjdhOTgwY2ExYTk3MjcyNzU0NzFjM2NmOTZlNjE0ZDcxMzdmZDUz"
    "ZWI4ZDkiLCJzaWciOiJjQlVSUGlCc2gzSWppL0JiOEgrZzRNUTUvYzd2NkE3dzJDcTd1MGIvRnNUbXVDcTh6aUZWTlNDMEEv"
    "dGIvZ1pacDBvWkJZNCtKbU5kZXhjUHZ4c1dCQT09In1dfSwiZW50aXR5IjoiZDJhMGFlYzllY2U0ZWQyMzc3N2I2N2E5ODBj"
    "YTFhOTcyNzI3NTQ3MWMzY2Y5NmU2MTRkNzEzN2ZkNTNlYjhkOSJ9LCJldmVudCI6ImNvdW50ZXJzaWduYXR1cmUiLCJwcmV2"
    "Ijoic2hhMjU2Ojc1YjdkOTQ5Y2Y3MDA1YTQ3MjVhNmE3OGNlZDY0YjNlYjNlOThkOGQ1NDE0YTRlOGE5MmI0NDg4NDgxMWVk"
    "YjYiLCJzZXEiOjMsInRpbWUiOiIyMDI2LTExLTIxVDA3OjM4OjI3WiJ9Cg=="
)

# RFC 6962 / 9162 reference vectors (certificate-transparency merkle_tree_test): tree heads over
# the first n of these leaves.
CT_LEAVES = [bytes.fromhex(h) for h in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                         "606162636465666768696a6b6c6d6e6f"]]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_merkle_tree_heads_match_the_rfc_reference_vectors() -> None:
    assert root_of([]).hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    for n, expected in enumerate(CT_ROOTS, start=1):
        assert root_of(CT_LEAVES[:n]).hex() == expected, n


def test_fingerprints_are_stable() -> None:
    assert OWNER.fingerprint == OWNER_FP and ENTITY.fingerprint == ENTITY_FP


def test_signed_message_is_byte_for_byte_stable() -> None:
    blob = sign_message({"job_id": "job-golden", "nonce": "00" * 16, "n": 7}, kind="offer", signer=ENTITY)
    assert blob.decode() == MESSAGE
    assert verify_message(MESSAGE.encode(), kind="offer", signer=ENTITY.card)["n"] == 7


def test_packed_masks_are_byte_for_byte_stable() -> None:
    masks = {"a.weight": torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool), "b": torch.tensor([True] * 9)}
    assert pack_masks(masks).hex() == MASK_HEX
    assert torch.equal(unpack_masks(bytes.fromhex(MASK_HEX))["a.weight"], masks["a.weight"])


def test_golden_sealed_bundle_still_opens() -> None:
    opened = open_bundle(base64.b64decode(SEALED_B64), kind="model", job_id="job-golden", request_hash=digest(b"golden offer"),
                         recipient=ENTITY, senders={OWNER.fingerprint: OWNER.card})
    assert opened.files["request.json"] == b'{"job_id":"job-golden"}'
    assert torch.equal(load(opened.files["weights.safetensors"])["w"], torch.arange(4, dtype=torch.float32))
    assert dict(opened.claims) == {"k": "v"}


def test_golden_audit_log_still_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(base64.b64decode(LOG_B64))
    verdict = verify_log(path, owner=OWNER.card, entity=ENTITY.card)
    assert verdict.ok, verdict.error
    assert (verdict.records, verdict.checkpoints, verdict.countersigned) == (4, 1, 2)
