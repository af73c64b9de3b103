"""The docs promise what the code does: the CLI reference is generated, the README's commands exist."""
import re
import subprocess
import sys

from helpers import ROOT


def test_cli_reference_is_current():
    fresh = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_cli_docs.py")], capture_output=True,
                           text=True, check=True, cwd=ROOT).stdout
    assert (ROOT / "docs" / "cli.md").read_text() == fresh, \
        "docs/cli.md is stale: run `python scripts/gen_cli_docs.py > docs/cli.md`"


def test_readme_commands_exist_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    for script in re.findall(r"^bash (scripts/\S+\.sh)", readme, flags=re.M):
        assert (ROOT / script).exists(), script
    assert "bash scripts/test.sh" in readme and "bash scripts/demo.sh" in readme
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_every_doc_link_resolves():
    for md in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+\.md)\)", md.read_text()):
            assert (md.parent / target).exists(), f"{md.name} links to missing {target}"
