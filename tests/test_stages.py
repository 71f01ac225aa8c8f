"""Seconds per stage: nested stages count each second once, and a fold's report carries them."""

from __future__ import annotations

import json
import time

import torch

import branchfold
from branchfold.stages import TOTAL, recording, stage


def test_nested_stages_count_each_second_once_in_the_innermost():
    with recording() as seconds:
        with stage("outer"):
            time.sleep(0.02)
            with stage("inner"):
                time.sleep(0.05)
            time.sleep(0.02)
        time.sleep(0.01)
    assert seconds["inner"] >= 0.05 and 0.04 <= seconds["outer"] < seconds["inner"]
    assert abs(sum(v for k, v in seconds.items() if k != TOTAL) - seconds[TOTAL]) < 1e-6
    assert seconds["other"] >= 0.01


def test_a_stage_outside_a_recording_records_nothing():
    with stage("alone"):
        pass
    with recording() as seconds:
        pass
    assert set(seconds) <= {TOTAL, "other"}


def test_a_fold_report_carries_its_stages_in_json_and_text():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).eval()
    report = branchfold.fold_with_report(m, (torch.randn(3, 4),)).report
    stages = json.loads(json.dumps(report.to_dict()))["stages"]
    assert {"capture", "walk", "weights", "verify", "report", TOTAL} <= set(stages)
    assert abs(sum(v for k, v in stages.items() if k != TOTAL) - stages[TOTAL]) < 1e-6
    assert "fold time:" in report.render() and "capture" in report.render()
