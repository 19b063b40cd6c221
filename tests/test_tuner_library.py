"""The tuner library: listing with metadata, import, rename, delete, export — never outside its folder."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from scedit_ui.tuner_library import TunerLibrary, sanitize_name
from tuners import CSCTuner, SCTuner, SkipLayout, TunerMetadata, load_tuner, save_tuner
from tuners.official import official_state_dict
from tuners.validation import UserInputError

LAYOUT = SkipLayout((8, 8, 8, 8, 16, 16, 16, 32, 32, 32, 32, 32), (False, False, False, True) * 3, ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11),))
OTHER_LAYOUT = SkipLayout((4, 4, 4), (False, False, True), ((0, 1, 2),))


def sc_tuner(layout: SkipLayout = LAYOUT, ratio: float = 0.5) -> SCTuner:
    tuner = SCTuner(layout, ratio)
    with torch.no_grad():
        for parameter in tuner.parameters():
            parameter.normal_(0, 0.1)
    return tuner


@pytest.fixture
def library(tmp_path) -> TunerLibrary:
    (tmp_path / "shipped").mkdir()
    return TunerLibrary(tmp_path / "library", shipped=tmp_path / "shipped")


def put(library: TunerLibrary, name: str, tuner=None, folder=None):
    tuner = tuner or sc_tuner()
    path = (folder or library.root) / f"{name}.safetensors"
    save_tuner(tuner, path, TunerMetadata.describe(tuner, "tiny", trigger_word="zq"))
    return path


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("my style", "my_style"), ("../../etc/passwd", "etc_passwd"), ("a/b\\c", "a_b_c"), ("x.safetensors", "x"),
        (" .hidden", "hidden"), ("ok-1.2_a", "ok-1.2_a"),
    ],
)
def test_names_are_sanitised_to_plain_file_stems(text, name):
    assert sanitize_name(text) == name


@pytest.mark.parametrize("text", ["", "   ", "..", "/", "***"])
def test_names_without_usable_characters_are_refused(text):
    with pytest.raises(UserInputError, match="not a usable tuner name"):
        sanitize_name(text)


def test_entries_list_kind_base_condition_parameters_and_size(library):
    put(library, "style")
    put(library, "edges", CSCTuner(LAYOUT, 1, "canny"))
    entries = {entry.name: entry for entry in library.entries()}
    style, edges = entries["style"], entries["edges"]
    assert style.kind == "sc" and style.metadata.base_architecture == "tiny" and style.metadata.trigger_word == "zq"
    assert style.num_parameters == sum(p.numel() for p in sc_tuner().parameters())
    assert style.size_bytes == style.path.stat().st_size > style.num_parameters * 4
    assert edges.kind == "csc" and edges.metadata.condition_type == "canny"
    assert style.fits(LAYOUT) and not style.fits(OTHER_LAYOUT)


def test_an_unreadable_file_is_listed_with_the_reason(library):
    library.root.mkdir()
    (library.root / "broken.safetensors").write_bytes(b"not a safetensors file")
    (entry,) = library.entries()
    assert entry.metadata is None and "not a readable safetensors file" in entry.error


def test_library_tuners_shadow_shipped_ones_and_shipped_ones_are_read_only(library):
    put(library, "shared", folder=library.shipped)
    put(library, "shipped_only", folder=library.shipped)
    put(library, "shared")
    assert library.names() == ["shared", "shipped_only"]
    assert library.resolve("shared") == library.root / "shared.safetensors"
    assert not library.entry("shared").shipped and library.entry("shipped_only").shipped
    with pytest.raises(UserInputError, match="read-only"):
        library.delete("shipped_only")
    with pytest.raises(UserInputError, match="read-only"):
        library.rename("shipped_only", "mine")


def test_rename_moves_the_file_and_refuses_to_overwrite(library):
    put(library, "a")
    put(library, "b")
    assert library.rename("a", "new name") == library.root / "new_name.safetensors"
    assert library.names() == ["b", "new_name"]
    with pytest.raises(UserInputError, match="already exists"):
        library.rename("b", "new_name")


def test_rename_cannot_leave_the_library_folder(library, tmp_path):
    put(library, "a")
    target = library.rename("a", "../../outside")
    assert target.parent == library.root and not list(tmp_path.glob("outside*"))


def test_delete_removes_only_that_file(library):
    put(library, "a")
    put(library, "b")
    library.delete("a")
    assert library.names() == ["b"]
    with pytest.raises(UserInputError, match="no tuner named"):
        library.delete("a")


def test_export_gives_the_stored_file(library):
    path = put(library, "a")
    assert library.export("a") == path


def test_import_copies_a_tuner_file_under_a_sanitised_name(library, tmp_path):
    source = put(library, "original", folder=tmp_path)
    target = library.import_file(source, name="my copy")
    assert target == library.root / "my_copy.safetensors" and target.read_bytes() == source.read_bytes()
    assert not list(library.root.glob(".*tmp"))  # atomic write leaves no temporary behind
    with pytest.raises(UserInputError, match="already exists"):
        library.import_file(source, name="my copy")


def test_import_refuses_a_file_whose_weights_do_not_fit_its_metadata(library, tmp_path):
    tuner = sc_tuner()
    bad = tmp_path / "bad.safetensors"
    save_file({"adapters.0.ln1.weight": torch.zeros(1)}, bad, metadata={"scedit": json.dumps(TunerMetadata.describe(tuner, "tiny").__dict__)})
    with pytest.raises(UserInputError, match="do not fit"):
        library.import_file(bad)
    assert library.names() == []


def test_import_of_a_non_tuner_without_a_base_explains_what_is_missing(library, tmp_path):
    junk = tmp_path / "junk.safetensors"
    save_file({"w": torch.zeros(2)}, junk)
    with pytest.raises(UserInputError, match="load a base model"):
        library.import_file(junk)


def test_import_of_an_unreadable_file_is_refused_in_one_message(library, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(UserInputError, match="cannot import junk.safetensors"):
        library.import_file(junk, layout=LAYOUT)


def test_import_converts_an_official_sc_checkpoint_for_the_loaded_layout(library, tmp_path):
    original = sc_tuner()
    k = LAYOUT.num_skips
    official = {f"lsc_identity.{k - 1 - g}.{n}": t for g, a in enumerate(original.adapters) for n, t in a.state_dict().items()}
    torch.save(official, tmp_path / "pytorch_model.bin")
    target = library.import_files([tmp_path / "pytorch_model.bin"], layout=LAYOUT, base_architecture="tiny")
    assert target.name == "scedit-imported.safetensors"
    imported, metadata = load_tuner(target, LAYOUT)
    assert metadata.kind == "sc" and all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), imported.state_dict().values()))


def test_import_files_keeps_the_official_configuration_beside_the_weights(library, tmp_path):
    original = CSCTuner(LAYOUT, 1, "depth")
    (tmp_path / "up").mkdir()
    save_file(official_state_dict(original), tmp_path / "up" / "adapter_model.safetensors")
    (tmp_path / "configuration.json").write_text(json.dumps({"condition_type": "depth"}))
    files = [tmp_path / "up" / "adapter_model.safetensors", tmp_path / "configuration.json"]
    target = library.import_files(files, layout=LAYOUT, base_architecture="tiny", name="depth")
    assert library.entry("depth").metadata.condition_type == "depth" and target.name == "depth.safetensors"


def test_import_of_an_official_checkpoint_for_other_skips_is_refused(library, tmp_path):
    original = sc_tuner(OTHER_LAYOUT)
    official = {f"lsc_identity.{2 - g}.{n}": t for g, a in enumerate(original.adapters) for n, t in a.state_dict().items()}
    save_file(official, tmp_path / "adapter_model.safetensors")
    with pytest.raises(UserInputError, match="cannot import"):
        library.import_file(tmp_path / "adapter_model.safetensors", layout=LAYOUT)
    assert library.names() == []


def test_save_writes_a_new_tuner_and_refuses_to_replace_one(library):
    tuner = sc_tuner()
    path = library.save(tuner, TunerMetadata.describe(tuner, "tiny"), "trained style")
    assert path.name == "trained_style.safetensors" and library.entry("trained_style").kind == "sc"
    with pytest.raises(UserInputError, match="already exists"):
        library.save(tuner, TunerMetadata.describe(tuner, "tiny"), "trained style")
