"""`prune-ofa recipes ls` and `prune-ofa recipes cp`: every shipped file listed, copies byte for byte,
never over an existing file, and an unknown name answered with the close ones."""
import os
import re
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.recipes_command import CONFIGS_DIR, copy_recipe, find_recipe, format_listing, shipped_recipes
from sparse_pretrain.runtime.errors import UserError


def test_ls_lists_every_file_under_configs_with_its_first_comment_line(capsys):
    walked = {os.path.relpath(os.path.join(folder, name), CONFIGS_DIR)
              for folder, dirs, files in os.walk(CONFIGS_DIR) for name in files if not name.startswith(".")}
    recipes = shipped_recipes()
    assert {r.path.relative_to(CONFIGS_DIR).as_posix() for r in recipes} == walked
    assert main(["recipes", "ls"]) == 0
    out = capsys.readouterr().out
    for r in recipes:
        assert f"  {r.name} " in out or out.count(f"  {r.name}\n") == 1
        first = next((line for line in r.path.read_text().splitlines() if line.lstrip().startswith("#")), "")
        start = first.strip().lstrip("#").strip()[:40].rsplit(" ", 1)[0]
        assert r.description.startswith(start) and len(r.description) <= 104, (r.name, r.description)
        assert not re.search(r"\w-$|\($", r.description), (r.name, r.description)   # no line cut mid-word
    by_name = {r.name: r for r in recipes}
    assert by_name["bert-base-uncased-90"].description == "BERT-Base uncased, 90% unstructured"
    assert by_name["bert-base-uncased-90"].kind == "" and "pre-training recipes" in out.splitlines()[0]


def test_a_description_is_the_first_sentence_of_the_opening_comment_joined_across_wrapped_lines(tmp_path):
    wrapped = "# Transfer of a sparse pre-trained model to SQuAD v1.1 (hub: rajpurkar/squad) with its zeros (pattern-\n"
    (tmp_path / "a.yaml").write_text(wrapped + "# lock) kept. More text.\n# Another line.\na: 1\n")
    (tmp_path / "b.yaml").write_text("# Offline default: student pruning of MiniLM\n# to 85%\na: 1\n")
    (tmp_path / "c.yaml").write_text("# " + "word " * 40 + "\n")
    by_name = {r.name: r.description for r in shipped_recipes(tmp_path)}
    assert by_name["a"] == ("Transfer of a sparse pre-trained model to SQuAD v1.1 (hub: rajpurkar/squad) with its "
                            "zeros ...")
    assert by_name["b"] == "Offline default: student pruning of MiniLM"
    assert by_name["c"].endswith(" ...") and len(by_name["c"]) <= 104


def test_a_new_folder_is_listed_under_its_name(tmp_path):
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "x.yaml").write_text("# an extra kind\na: 1\n")
    (tmp_path / "top.yaml").write_text("a: 1\n")                       # no comment: no description
    (tmp_path / ".hidden.yaml").write_text("# hidden\n")
    recipes = shipped_recipes(tmp_path)
    assert [(r.name, r.kind, r.description) for r in recipes] == [("top", "", ""), ("extra/x", "extra",
                                                                                     "an extra kind")]
    assert "extra:\n  extra/x  an extra kind" in format_listing(recipes)


def test_cp_copies_byte_for_byte_and_never_overwrites(tmp_path, capsys):
    source = CONFIGS_DIR / "finetune" / "squad-transfer.yaml"
    assert main(["recipes", "cp", "finetune/squad-transfer", str(tmp_path / "mine.yaml")]) == 0
    assert (tmp_path / "mine.yaml").read_bytes() == source.read_bytes()
    assert "prune-ofa launch finetune|qat --config " + str(tmp_path / "mine.yaml") in capsys.readouterr().out
    (tmp_path / "edited.yaml").write_text("mine\n")
    assert main(["recipes", "cp", "bert-base-uncased-90", str(tmp_path / "edited.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; not overwritten" in err
    assert (tmp_path / "edited.yaml").read_text() == "mine\n"
    folder = tmp_path / "recipes"
    folder.mkdir()
    recipe = find_recipe("squad-transfer.yaml", shipped_recipes())           # a file name alone, one folder has it
    assert copy_recipe(recipe, folder) == folder / "squad-transfer.yaml"
    assert copy_recipe(recipe, str(tmp_path / "new") + "/") == tmp_path / "new" / "squad-transfer.yaml"


def test_an_unknown_or_ambiguous_name_says_which_are_close(tmp_path, capsys):
    assert main(["recipes", "cp", "squad-transfr", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no shipped recipe 'squad-transfr'" in err and "finetune/squad-transfer" in err
    assert not (tmp_path / "x.yaml").exists()
    for kind in ("a", "b"):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "same.yaml").write_text("a: 1\n")
    with pytest.raises(UserError, match="'same' is in several folders: a/same, b/same"):
        find_recipe("same", shipped_recipes(tmp_path))
    with pytest.raises(UserError, match="none is close"):
        find_recipe("zzzzzz", shipped_recipes(tmp_path))
    assert Path(find_recipe("configs/a/same.yaml", shipped_recipes(tmp_path)).path).parent.name == "a"
