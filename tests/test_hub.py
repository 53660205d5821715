"""The fast Hub check, against loopback servers standing in for the Hub."""

import pytest

from ddpm_hf.errors import UserError
from ddpm_hf.hub import check_dataset_on_hub


def test_a_known_dataset_passes(loopback_hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", loopback_hub(200, b'{"id": "ylecun/mnist", "private": false}'))
    check_dataset_on_hub("ylecun/mnist")  # no error


def test_an_unknown_dataset_and_a_server_that_is_not_the_hub(loopback_hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", loopback_hub(401, b'{"error": "Invalid username or password."}'))
    with pytest.raises(UserError, match="'someone/secret' was not found on the Hub .* answered 401.*hf auth login"):
        check_dataset_on_hub("someone/secret")
    monkeypatch.setenv("HF_ENDPOINT", loopback_hub(200, b"<html>a captive portal</html>"))
    with pytest.raises(UserError, match="did not answer like the Hugging Face Hub"):
        check_dataset_on_hub("ylecun/mnist")
    monkeypatch.setenv("HF_ENDPOINT", loopback_hub(503, b"{}"))
    with pytest.raises(UserError, match="answered 503 .*try again later.*mnist-5k-offline"):
        check_dataset_on_hub("ylecun/mnist")
