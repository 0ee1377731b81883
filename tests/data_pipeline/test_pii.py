import random

from datatrove.data import Document

from lmlab.data.pipeline.pii import PIIMasker, luhn_valid, valid_cn_id

from .synthetic import cn_resident_id, number_decoys, pii_samples

REPL = {"email": "<EMAIL>", "ip": "<IP>", "phone": "<PHONE>", "cn_id": "<ID>", "bank_card": "<CARD>"}


def test_every_planted_pattern_masked_and_ordinary_numbers_kept():
    masker = PIIMasker(REPL, max_hits=1000)
    rng = random.Random(0)
    for _ in range(300):
        pii = pii_samples(rng)
        decoys = number_decoys(rng)
        text = ("Contact: " + ", ".join(pii.values()) + ". In " + decoys[0] + " it cost "
                + decoys[1] + " (" + ", ".join(decoys[2:]) + ").\n联系电话" + pii["cn_mobile"] + "，谢谢。")
        masked, hits = masker.mask(text)
        for kind, value in pii.items():
            assert value not in masked, (kind, value, masked)
        for d in decoys:
            assert d in masked, (d, masked)
        assert sum(hits.values()) == len(pii) + 1


def test_validators():
    rng = random.Random(1)
    ids = [cn_resident_id(rng) for _ in range(50)]
    assert all(valid_cn_id(i) for i in ids)
    broken = [i[:-1] + ("0" if i[-1] != "0" else "1") for i in ids]
    assert not any(valid_cn_id(i) for i in broken)
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")


def test_invalid_lookalikes_not_masked():
    masker = PIIMasker(REPL)
    text = ("Order 4111111111111112 shipped; ID 110101199001011230 is wrong; "
            "version 1.2.3, 300.1.1.1, call 12345.")
    masked, hits = masker.mask(text)
    assert masked == text and not hits


def test_too_many_hits_drops_document():
    masker = PIIMasker(REPL, max_hits=2)
    keep = Document(text="mail a@example.com please", id="1")
    drop = Document(text="a@example.com b@example.com c@example.com", id="2")
    assert masker.filter(keep) is True and "<EMAIL>" in keep.text
    assert masker.filter(drop) == (False, "pii_too_many")
