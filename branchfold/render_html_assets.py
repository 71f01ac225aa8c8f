"""The HTML report's inline style sheet and script (kept apart from the markup that ``render_html`` writes).

The script does two things: the filter (a search box and one chip per reason, which hide what does not
match; a link can set either, ``page.html#reason=geometry``, ``page.html#filter=blocks.3``), and a self-check run on load that compares the page with the report data embedded in it (every
region counted once, every reason present) and writes its verdict into ``body[data-selfcheck]``, with any
script error in ``body[data-jserror]``: a headless browser's dump of the DOM then says whether the page works.
"""

CSS = """
:root { --fg:#1d2430; --muted:#5b6473; --line:#d5dae1; --bg:#f6f7f9; --card:#fff; --ok:#2e9d5b;
        --bad:#d64545; --before:#9aa5b5; --after:#2e9d5b; --blue:#3b7dd8; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:var(--fg);
       background:var(--bg); }
main { max-width:1180px; margin:0 auto; padding:20px 24px 60px; }
h1 { font-size:22px; margin:0 0 4px; } h2 { font-size:17px; margin:0 0 10px; }
h3 { font-size:14px; margin:0 0 8px; font-weight:600; }
section { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:16px 18px;
          margin:14px 0; }
.lead { color:var(--muted); margin:0; }
.badge { font-size:12px; padding:2px 8px; border-radius:10px; vertical-align:middle; color:#fff; }
.badge.ok { background:var(--ok); } .badge.bad { background:var(--bad); } .badge.neutral { background:#8a93a3; }
.bar-row { display:grid; grid-template-columns:120px 1fr 70px; align-items:center; gap:10px; margin:6px 0; }
.bar-label { color:var(--muted); } .ratio { font-weight:600; text-align:right; }
.bars .bar { height:18px; border-radius:3px; margin:2px 0; min-width:2px; position:relative; }
.bars .bar span { position:absolute; left:6px; top:0; font-size:12px; line-height:18px; white-space:nowrap;
                  color:#fff; text-shadow:0 0 2px rgba(0,0,0,.45); }
.bar.before { background:var(--before); } .bar.after { background:var(--after); }
.gauge { position:relative; height:10px; background:linear-gradient(90deg,#e8f5ee,#fdeaea); border-radius:5px;
         max-width:480px; }
.gauge .err { height:10px; background:var(--ok); border-radius:5px; }
.gauge .tol { position:absolute; top:-4px; width:2px; height:18px; background:var(--bad); }
.gauge-scale { display:flex; justify-content:space-between; max-width:480px; font-size:11px; color:var(--muted); }
table { border-collapse:collapse; width:100%; margin:6px 0; font-size:13px; }
th, td { text-align:left; padding:4px 8px; border-bottom:1px solid var(--line); vertical-align:top; }
td.num, th.num { text-align:right; white-space:nowrap; }
table.stages { width:auto; } .mini { height:8px; background:var(--blue); border-radius:3px; min-width:2px; width:0; }
table.stages td:last-child { width:200px; }
.strip-box { position:relative; margin:8px 0 26px; }
svg.strip { width:100%; height:34px; display:block; border-radius:4px; }
.ticks { position:relative; height:16px; }
.tick { position:absolute; top:2px; font-size:10px; color:var(--muted); border-left:1px solid var(--muted);
        padding-left:2px; white-space:nowrap; }
.legend { display:flex; gap:14px; font-size:12px; color:var(--muted); }
.key i { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:4px; vertical-align:-1px; }
.card { border:1px solid var(--line); border-radius:6px; padding:10px 12px; margin:10px 0; background:#fcfcfd; }
.times { background:#eef1f5; border-radius:9px; padding:0 7px; font-size:12px; font-weight:600; }
.place { color:var(--muted); font-weight:400; margin-left:6px; }
.region-svg { max-width:100%; height:auto; display:block; margin:4px 0; }
.region-svg .edge { fill:none; stroke:#8a93a3; stroke-width:1.3; }
.region-svg rect.op { fill:#eef3fb; stroke:#7d9bd1; } .region-svg rect.src { fill:#f1f2f4; stroke:#a7afbb; }
.region-svg rect.result { fill:#e6f5ec; stroke:var(--ok); stroke-width:1.6; }
.region-svg circle.sum { fill:#fff7e6; stroke:#e39b2d; }
.region-svg text { font:12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; fill:var(--fg); }
.region-svg .box-t, .region-svg .sum-t { text-anchor:middle; } .region-svg .sum-t { font-size:16px; }
.region-svg .arrow { font-size:22px; fill:var(--ok); } .region-svg .result-t { font-weight:600; }
.region-svg .sign { fill:var(--bad); font-weight:700; }
.macs { color:var(--muted); margin:2px 0 4px; font-size:12px; }
ul.instances { columns:3; font-size:12px; margin:6px 0; }
details > summary { cursor:pointer; color:var(--muted); }
details.reason { border-top:1px solid var(--line); padding:6px 0; }
details.reason > summary { color:var(--fg); }
.ats { color:var(--muted); font-size:11px; max-height:4.5em; overflow:auto; }
.filter input { width:100%; max-width:420px; padding:6px 10px; border:1px solid var(--line); border-radius:6px;
                font:inherit; margin:4px 0 8px; }
.chips { margin:4px 0 10px; }
.chip { border:1px solid var(--line); background:#fff; border-radius:14px; padding:3px 10px; margin:2px;
        cursor:pointer; font:inherit; font-size:12px; }
.chip.on { background:var(--fg); color:#fff; border-color:var(--fg); }
.why { color:var(--muted); margin:8px 0 0; }
.hidden { display:none !important; }
b.bad { color:var(--bad); }
@media print { .filter, .chips { display:none; } details { display:block; } }
"""

SCRIPT = r"""
(function () {
  var body = document.body;
  window.addEventListener('error', function (e) {
    body.setAttribute('data-jserror', String(e.message || e));
  });
  var data = JSON.parse(document.getElementById('report-data').textContent);
  var chosen = null;
  function apply() {
    var box = document.getElementById('filter');
    var text = box ? box.value.trim().toLowerCase() : '';
    document.querySelectorAll('article.region').forEach(function (el) {
      var hit = !text || el.getAttribute('data-search').indexOf(text) >= 0;
      el.classList.toggle('hidden', !hit || chosen !== null);
    });
    document.querySelectorAll('details.reason').forEach(function (sec) {
      var reason = sec.getAttribute('data-reason'), shown = 0;
      sec.querySelectorAll('tr.row').forEach(function (row) {
        var hit = (chosen === null || reason === chosen) &&
                  (!text || row.getAttribute('data-search').indexOf(text) >= 0);
        row.classList.toggle('hidden', !hit);
        if (hit) { shown++; }
      });
      sec.classList.toggle('hidden', shown === 0);
    });
    document.querySelectorAll('.chip').forEach(function (c) {
      c.classList.toggle('on', c.getAttribute('data-reason') === chosen);
    });
  }
  var box = document.getElementById('filter');
  if (box) { box.addEventListener('input', apply); }
  document.querySelectorAll('.chip').forEach(function (c) {
    c.addEventListener('click', function () {
      var r = c.getAttribute('data-reason');
      chosen = chosen === r ? null : r;
      apply();
    });
  });
  // a link can carry a filter: page.html#reason=geometry or page.html#filter=blocks.3
  var hash = decodeURIComponent(location.hash.slice(1));
  if (hash.indexOf('reason=') === 0) { chosen = hash.slice(7); apply(); }
  if (hash.indexOf('filter=') === 0 && box) { box.value = hash.slice(7); apply(); }
  function selfcheck() {
    var problems = [];
    var regions = 0;
    document.querySelectorAll('article.region').forEach(function (el) {
      regions += parseInt(el.getAttribute('data-count'), 10);
    });
    var folded = (data.folded || []).length;
    if (regions !== folded) { problems.push('regions on the page ' + regions + ' of ' + folded); }
    var seen = {};
    document.querySelectorAll('details.reason').forEach(function (el) {
      var r = el.getAttribute('data-reason');
      seen[r] = (seen[r] || 0) + parseInt(el.getAttribute('data-count'), 10);
    });
    var want = {};
    (data.not_folded || []).forEach(function (s) { want[s.reason] = (want[s.reason] || 0) + 1; });
    Object.keys(want).forEach(function (r) {
      if (seen[r] !== want[r]) { problems.push('reason ' + r + ': ' + (seen[r] || 0) + ' of ' + want[r]); }
    });
    if (document.querySelectorAll('svg.region-svg').length < Math.min(folded, 1)) {
      problems.push('no region drawn');
    }
    body.setAttribute('data-selfcheck', problems.length ? 'failed: ' + problems.join('; ') : 'ok');
  }
  selfcheck();
})();
"""
