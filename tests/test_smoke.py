"""A first round trip: enc_keys then dec_keys over real mutual TLS."""

from tests.kmetest import RunningKME


async def test_round_trip(kme: RunningKME) -> None:
    """Items 43, 58: the slave gets the master's key bytes under the same key_ID."""
    master = kme.client("SAE_A")
    slave = kme.client("SAE_B")
    got = await master.post("/api/v1/keys/SAE_B/enc_keys", json={"number": 2})
    assert got.status_code == 200, got.text
    ids = [k["key_ID"] for k in got.json()["keys"]]
    back = await slave.post(
        "/api/v1/keys/SAE_A/dec_keys", json={"key_IDs": [{"key_ID": i} for i in ids]}
    )
    assert back.status_code == 200, back.text
    assert back.json() == got.json()
    assert await kme.delivered_rows() == 0
