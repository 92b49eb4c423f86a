"""Image specs end to end without I/O: the SDK's chain, requirements files, Dockerfile rendering, agent cache rules."""

from __future__ import annotations

from pathlib import Path

import duanflow as df
import pytest
from duanflow._errors import InvalidOptionError
from duanflow_agent.image_rules import check_python, evictions, image_dir_name, venv_python, with_image_paths
from duanflow_builder.dockerfile import base_image, cuda_tag, render
from duanflow_builder.domain import image_id
from duanflow_proto.errors import InvalidInputError
from duanflow_proto.messages.build import ImageSpec

pytestmark = pytest.mark.timeout(10)


def product_image() -> df.Image:
    return (
        df.Image.cuda("12.4", python="3.11")
        .pip_install("torch", "transformers", "accelerate")
        .apt_install("ffmpeg")
        .run_commands("echo ready > /ready")
        .env({"HF_HOME": "/cache"})
        .workdir("/app")
    )


def test_product_page_chain_is_canonical_data() -> None:
    spec = product_image().to_spec()
    assert spec == ImageSpec(
        base="cuda",
        cuda="12.4",
        python="3.11",
        pip=["torch", "transformers", "accelerate"],
        apt=["ffmpeg"],
        commands=["echo ready > /ready"],
        env={"HF_HOME": "/cache"},
        workdir="/app",
    )
    assert image_id(spec) == image_id(product_image().to_spec())


def test_requirements_file_becomes_spec_entries(tmp_path: Path) -> None:
    (tmp_path / "base.txt").write_text("numpy==2.0  # pinned\n")
    req = tmp_path / "requirements.txt"
    req.write_text("# deps\n\nrequests>=2\n-r base.txt\n")
    image = df.Image.debian_slim(python="3.11").pip_install("rich").pip_install_from_requirements(req)
    assert image.to_spec().pip == ["rich", "requests>=2", "numpy==2.0"]
    req.write_text("requests>=3\n")
    assert image_id(df.Image.debian_slim().pip_install_from_requirements(req).to_spec()) != image_id(
        df.Image.debian_slim().pip_install_from_requirements(tmp_path / "base.txt").to_spec()
    )


@pytest.mark.parametrize(
    ("text", "needle"), [("-e ./pkg\n", "requirements.txt:1: pip option '-e'"), ("--index-url x\n", "--index-url")]
)
def test_requirements_options_refused(tmp_path: Path, text: str, needle: str) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text(text)
    with pytest.raises(InvalidOptionError, match=needle):
        df.Image.debian_slim().pip_install_from_requirements(req)


def test_missing_requirements_file_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="cannot read"):
        df.Image.debian_slim().pip_install_from_requirements(tmp_path / "nope.txt")


def test_unknown_image_method_names_the_right_one() -> None:
    with pytest.raises(AttributeError, match=r"no method \.pip_instal\(\): did you mean \.pip_install\(\)"):
        df.Image.debian_slim().pip_instal("x")


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_layers_in_stable_order() -> None:
    text = render(product_image().to_spec())
    order = ["FROM nvidia/cuda:12.4.1", "apt-get install", "uv venv --python 3.11", "uv pip install", "RUN echo ready"]
    positions = [text.index(marker) for marker in order]
    assert positions == sorted(positions)
    assert 'ENV HF_HOME="/cache"' in text and text.rstrip().endswith('WORKDIR "/app"')
    assert "'torch' " not in text and "torch transformers accelerate" in text
    assert render(product_image().to_spec()) == text


def test_dockerfile_base_override_and_quoting() -> None:
    text = render(ImageSpec(python="3.12", pip=["numpy>=2"], apt=["git"]), base="local/python:3.12")
    assert "FROM local/python:3.12\n" in text and "'numpy>=2'" in text
    assert base_image(ImageSpec(python="3.12")) == "python:3.12-slim-bookworm"
    assert cuda_tag("11.8") == "nvidia/cuda:11.8.0-cudnn-runtime-ubuntu22.04"
    assert cuda_tag("12.4.0").startswith("nvidia/cuda:12.4.0-")


def test_editing_pip_keeps_the_apt_layer() -> None:
    a = render(ImageSpec(apt=["git"], pip=["a"])).splitlines()
    b = render(ImageSpec(apt=["git"], pip=["b"])).splitlines()
    first_diff = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    assert "uv pip install" in a[first_diff] and any("apt-get" in line for line in a[:first_diff])


# --------------------------------------------------------------------------- agent image cache rules


def test_lru_evicts_oldest_first_and_keeps_busy() -> None:
    entries = {"a": (1.0, 40), "b": (2.0, 40), "c": (3.0, 40), "d": (4.0, 40)}
    assert evictions(entries, 100, keep=set()) == ["a", "b"]
    assert evictions(entries, 100, keep={"a"}) == ["b", "c"]
    assert evictions(entries, 1000, keep=set()) == []
    assert evictions(entries, 0, keep={"a", "b", "c", "d"}) == []


def test_image_python_must_match_the_agent() -> None:
    assert venv_python("home = /usr/bin\nimplementation = CPython\nversion_info = 3.12.1\n") == "3.12"
    assert venv_python("version = 3.11.4\n") == "3.11"
    check_python("im-1", "3.11", "3.11")
    check_python("im-1", "", "3.11")
    with pytest.raises(InvalidInputError, match=r"built for Python 3\.12 but this agent runs .* 3\.11"):
        check_python("im-1", "3.12", "3.11")


def test_image_paths_go_after_the_bundle() -> None:
    assert with_image_paths("/bundle", ["/img/a"]) == "/bundle:/img/a"
    assert with_image_paths("/bundle:/x:/y", []) == "/bundle:/x:/y"
    with pytest.raises(InvalidInputError):
        image_dir_name("../etc")
