"""Secrets without I/O: AES-GCM sealing, the use cases over a fake store, the CLI's KEY=VALUE and dotenv parsing."""

from __future__ import annotations

import pytest
from duanflow._cli.output import CliError
from duanflow._cli.secret import parse_dotenv, parse_pairs
from duanflow_agent.image_rules import mask, masking, secret_values
from duanflow_proto.errors import ConflictError, InvalidInputError, NotFoundError
from duanflow_proto.messages.release import AppSpec, FunctionSpec
from duanflow_proto.messages.secret import SecretCreateRequest, SecretDeleteRequest, SecretListRequest
from duanflow_router.adapters.crypto import AesGcmSealer
from duanflow_router.ports_secrets import SealedValue, SecretRow, UnsealError
from duanflow_router.secrets import Secrets, all_names, check_name, context, names_of

KEY = "k" * 32
VALUE = "hf_Sup3rSecretTokenValue"


class FakeStore:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], SecretRow] = {}

    async def put(self, row: SecretRow, *, replace: bool) -> bool:
        if (row.env, row.name) in self.rows and not replace:
            return False
        self.rows[(row.env, row.name)] = row
        return True

    async def get(self, env: str, names: list[str]) -> dict[str, SecretRow]:
        return {n: self.rows[(env, n)] for n in names if (env, n) in self.rows}

    async def list(self, env: str) -> list[SecretRow]:
        return [r for (e, _), r in sorted(self.rows.items()) if e == env]

    async def delete(self, env: str, name: str) -> SecretRow | None:
        return self.rows.pop((env, name), None)


def test_seal_round_trip_and_no_plaintext() -> None:
    sealer = AesGcmSealer(KEY)
    sealed = sealer.seal(VALUE.encode(), context("main", "hf-prod"))
    assert VALUE.encode() not in sealed.ciphertext and len(sealed.nonce) == 12
    assert sealer.unseal(sealed, context("main", "hf-prod")) == VALUE.encode()
    again = sealer.seal(VALUE.encode(), context("main", "hf-prod"))
    assert again.nonce != sealed.nonce and again.ciphertext != sealed.ciphertext


def test_unseal_refuses_other_key_other_row_and_tampering() -> None:
    sealer = AesGcmSealer(KEY)
    sealed = sealer.seal(b"v", context("main", "a"))
    with pytest.raises(UnsealError, match="another secret key"):
        AesGcmSealer("other-key-" + "x" * 30).unseal(sealed, context("main", "a"))
    with pytest.raises(UnsealError, match="authenticate"):
        sealer.unseal(sealed, context("main", "b"))  # copied to another row
    flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    with pytest.raises(UnsealError):
        sealer.unseal(SealedValue(sealed.key_id, sealed.nonce, flipped), context("main", "a"))


def test_short_key_refused() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        AesGcmSealer("short")


async def test_create_list_values_delete() -> None:
    store = FakeStore()
    secrets = Secrets(store, AesGcmSealer(KEY), now_ms=lambda: 1000)
    info = await secrets.create(SecretCreateRequest(name="hf-prod", values={"HF_TOKEN": VALUE, "B": "2"}))
    assert info.keys == ["B", "HF_TOKEN"] and info.created_ms == 1000
    row = store.rows[("main", "hf-prod")]
    assert VALUE.encode() not in row.sealed.ciphertext
    listed = await secrets.list(SecretListRequest())
    assert [s.name for s in listed.secrets] == ["hf-prod"] and VALUE not in repr(listed)
    assert await secrets.values("main", ["hf-prod"]) == {"HF_TOKEN": VALUE, "B": "2"}
    with pytest.raises(ConflictError):
        await secrets.create(SecretCreateRequest(name="hf-prod", values={"X": "1"}, replace=False))
    await secrets.delete(SecretDeleteRequest(name="hf-prod"))
    with pytest.raises(NotFoundError, match="no secret 'hf-prod'"):
        await secrets.delete(SecretDeleteRequest(name="hf-prod"))


async def test_missing_secrets_are_named_and_envs_are_separate() -> None:
    secrets = Secrets(FakeStore(), AesGcmSealer(KEY))
    await secrets.create(SecretCreateRequest(name="a", env="prod", values={"A": "1"}))
    with pytest.raises(NotFoundError) as caught:
        await secrets.require("main", ["a", "b"])
    assert (
        "'a'" in caught.value.message
        and "'b'" in caught.value.message
        and "duanflow secret create" in (caught.value.message)
    )
    await secrets.require("prod", ["a"])


async def test_later_secret_wins_a_shared_key() -> None:
    secrets = Secrets(FakeStore(), AesGcmSealer(KEY))
    await secrets.create(SecretCreateRequest(name="one", values={"K": "1", "A": "a"}))
    await secrets.create(SecretCreateRequest(name="two", values={"K": "2"}))
    assert await secrets.values("main", ["one", "two"]) == {"K": "2", "A": "a"}


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({}, "at least one"),
        ({"1BAD": "x"}, "not an environment variable"),
        ({"DUANFLOW_NATS_PASSWORD": "x"}, "set by the platform"),
        ({"PYTHONPATH": "/x"}, "set by the platform"),
        ({"A": "x\0y"}, "NUL"),
    ],
)
async def test_bad_values_refused(values: dict[str, str], needle: str) -> None:
    secrets = Secrets(FakeStore(), AesGcmSealer(KEY))
    with pytest.raises(InvalidInputError, match=needle):
        await secrets.create(SecretCreateRequest(name="s", values=values))


@pytest.mark.parametrize("name", ["", "Upper", "a b", "-x", "a" * 64, "a.b"])
def test_bad_names_refused(name: str) -> None:
    with pytest.raises(InvalidInputError, match="invalid secret name"):
        check_name(name)


async def test_no_key_says_which_setting() -> None:
    secrets = Secrets(FakeStore(), None)
    with pytest.raises(InvalidInputError, match="DUANFLOW_ROUTER_SECRET_KEY"):
        await secrets.create(SecretCreateRequest(name="s", values={"A": "1"}))
    await secrets.require("main", [])  # an app without secrets deploys on a keyless router


def test_names_of_app_and_function() -> None:
    fn = FunctionSpec(name="f", secrets=["fn-only", "shared"])
    spec = AppSpec(name="a", module="m", functions=[fn, FunctionSpec(name="g")], secrets=["shared", "app"])
    assert names_of(spec, fn) == ["shared", "app", "fn-only"]
    assert names_of(spec, spec.functions[1]) == ["shared", "app"]
    assert all_names(spec) == ["shared", "app", "fn-only"]


def test_cli_pairs_and_dotenv() -> None:
    assert parse_pairs(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(CliError, match="not KEY=VALUE"):
        parse_pairs(["novalue"])
    with pytest.raises(CliError, match="environment variable name"):
        parse_pairs(["1A=2"])
    text = "# c\n\nexport A=1\nB='two words'\nC=\"q\"\nD=plain # note\n"
    assert parse_dotenv(text, ".env") == {"A": "1", "B": "two words", "C": "q", "D": "plain"}
    with pytest.raises(CliError, match=r"\.env:2"):
        parse_dotenv("A=1\nnot a line\n", ".env")


def test_secret_values_are_masked_in_replica_output() -> None:
    values = secret_values({"TOKEN": VALUE, "PLAIN": "visible", "SHORT": "1"}, ["TOKEN", "SHORT"])
    assert values == [VALUE]
    seen: list[tuple[str, str]] = []
    sink = masking(lambda stream, line: seen.append((stream, line)), values)
    sink("stdout", f"token is {VALUE}!")
    assert seen == [("stdout", "token is ***!")]
    assert mask("ab abc", ["abc", "ab"]) == "*** ***"
