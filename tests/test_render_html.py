"""The HTML report page: every region and every reason of the report is on it, identical regions are grouped,
it is one self-contained file, and it is a pure function of the report's plain data."""

from __future__ import annotations

import json
import re

import pytest
from helpers import made_up_report

from branchfold import fold_with_report
from branchfold.render_html import group_regions, render_html, span
from branchfold.report import FoldReport
from branchfold.zoo import ZOO


@pytest.fixture(scope="module")
def repvgg_report() -> FoldReport:
    entry = ZOO["repvgg"]
    model = entry.build().eval()
    return fold_with_report(model, entry.example_input(model, 2)).report


def test_every_region_and_every_reason_of_a_zoo_model_is_on_the_page(repvgg_report):
    page = repvgg_report.to_html("repvgg")
    assert repvgg_report.folded and len(re.findall(r'data-region="\d+"', page)) == len(repvgg_report.folded)
    for region in repvgg_report.folded:
        assert f"<code>{region.at}</code>" in page
        assert region.became and region.became in page
    counts = [int(n) for n in re.findall(r'<article class="card region"[^>]*data-count="(\d+)"', page)]
    assert sum(counts) == len(repvgg_report.folded)
    assert "Conv 3x3 s1" in page and "BN " in page  # the branches as a person names them


def test_every_reason_has_its_section_with_its_count_and_places():
    report = made_up_report()
    page = report.to_html()
    for reason, count in report.skipped_by_reason().items():
        assert re.search(rf'<details class="reason"[^>]*data-reason="{reason}" data-count="{count}"', page), reason
    for s in report.not_folded:
        assert s.at in page and s.detail.split(";")[0] in page
    assert 'id="undone"' in page and "verification failed" in page and "fused less" in page
    assert "broadcast <b>5</b>" in page  # the filter chip with the count
    assert "blocks 0–4" in page  # five places grouped, not five rows


def test_identical_regions_are_one_card_with_their_count_and_blocks():
    report = made_up_report()
    groups = group_regions(report.to_dict()["folded"])
    assert [len(g) for g in groups] == [12, 1, 1]
    page = report.to_html()
    assert "× 12" in page and "blocks 0–11 · mlp" in page
    assert page.count('class="region-svg"') == 3  # one drawing per shape, not per region


def test_the_page_is_self_contained_and_escapes_what_it_shows():
    report = made_up_report()
    report.folded[0].at = "</script><script>alert(1)</script>"
    page = report.to_html()
    assert not re.search(r"\b(src|href)=\"(https?:)?//", page) and "<link" not in page and "@import" not in page
    assert "<script>alert(1)" not in page
    assert "a &lt;note&gt; &amp; more" in page
    data = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(data)["folded"][0]["at"] == report.folded[0].at


def test_a_report_read_back_from_json_renders_the_same(repvgg_report):
    for report in (repvgg_report, made_up_report()):
        again = json.loads(json.dumps(report.to_dict()))
        assert render_html(again, "t") == report.to_html("t")
    assert "folded regions" in repvgg_report.render()  # the text table still works


def test_the_strip_marks_folded_skipped_and_undone_places():
    page = made_up_report().to_html()
    strip = re.search(r'<svg class="strip".*?</svg>', page, re.S).group(0)
    assert 'viewBox="0 0 14 20"' in strip
    assert strip.count('fill="#2e9d5b"') >= 1 and strip.count('fill="#e39b2d"') == 1  # folded run, mul_0
    assert strip.count('fill="#d64545"') == 1 and "failed-check: add_13" in strip
    assert 'href="#group-0"' in strip


def test_fusions_verification_and_stages_are_shown():
    page = made_up_report().to_html()
    fusions = re.search(r'<section id="fusions">.*?</section>', page, re.S).group(0)
    assert "FusedConv" in fusions and "<td class=\"num\">−1</td>" in fusions and "Gelu" in fusions
    assert "3.00e-07" in page and "1e-05" in page and "batch sizes 2, 1" in page
    assert "verifying" in page and "1.50 s" in page


def test_span_names_the_varying_block_index():
    assert span(["blocks.0.attn", "blocks.1.attn", "blocks.2.attn", "blocks.5.attn"]) == "blocks 0–2, 5 · attn"
    assert span(["layers.3", "layers.4"]) == "layers 3, 4"
    assert span(["blocks.0.attn.q", "blocks.1.attn.k"]) == "blocks 0, 1 · attn.k, attn.q"
    assert span(["stem", "head"]) == "2 places" and span(["", ""]) == "" and span(["stem"]) == "stem"


def test_a_failed_verification_is_said_at_the_top():
    report = made_up_report()
    report.verified, report.max_error = False, 0.5
    page = report.to_html()
    assert "verification failed" in page.split("</header>")[0] and "<b>above</b>" in page


def test_an_empty_report_renders():
    page = FoldReport().to_html()
    assert "Nothing folded" in page and "not verified" in page


def test_a_shortcut_into_a_sum_is_drawn_as_an_identity_branch():
    from branchfold.render_svg import region_svg

    residual = {"steps": [{"label": "Linear 8→8", "op": "affine", "inputs": [-1]},
                          {"label": "+", "op": "add", "inputs": [-1, 0]}], "became": "Linear 8→8"}  # fmt: skip
    svg = region_svg(residual)
    assert svg.count(">identity</text>") == 1 and svg.count('class="sum"') == 1
    assert region_svg({**residual, "steps": residual["steps"][:1]}).count(">identity</text>") == 0


def test_a_horizontal_group_is_drawn_as_its_members_and_the_wide_op():
    from branchfold.report import horizontal_report

    report = FoldReport(folded=[horizontal_report(["q", "k", "v"], "ln", (64, 64, 128), "dense")])
    page = report.to_html()
    assert "Linear →256 + Split 64/64/128" in page and page.count("Linear →64<") == 2
    svg = re.search(r'<svg class="region-svg".*?</svg>', page, re.S).group(0)
    assert svg.count('class="edge"') == 6  # input to each member, each member to the wide op


def test_partial_data_renders_and_low_precision_errors_are_shown():
    report = made_up_report().to_dict()
    report.update(tolerance=None, error_vs_fp32=2e-3, original_error_vs_fp32=None, graph=[], stages={})
    page = render_html(report)
    assert "Against an fp32 reference: folded 2.00e-03" in page and 'id="where"' not in page
