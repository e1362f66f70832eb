// NovaCron operator dashboard: renders migrations, alerts and SVG line charts from the data the
// page embeds, then refreshes them from /dashboard/data/ every REFRESH_MS. Each running migration's
// bar follows its event stream (migrations/follow.js); when a stream fails, a note says so and the
// bar moves with the refresh instead. A migrating VM's name links to its console page. Plain JS, no
// build step.
(function () {
  "use strict";
  var REFRESH_MS = 5000;
  var SVG = "http://www.w3.org/2000/svg";
  var STREAMS = document.body.getAttribute("data-streams");
  var live = {};       // migration id -> its latest streamed state
  var followed = {};   // migration id -> true once a stream was opened for it
  var shown = [];      // the migrations last rendered

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) { node.setAttribute(key, attrs[key]); });
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function fmt(value) {
    if (value === null || value === undefined || isNaN(value)) return "–";
    var abs = Math.abs(value);
    if (abs >= 1e9) return (value / 1e9).toFixed(1) + "G";
    if (abs >= 1e6) return (value / 1e6).toFixed(1) + "M";
    if (abs >= 1e3) return (value / 1e3).toFixed(1) + "k";
    if (abs >= 10 || value === 0) return value.toFixed(0);
    return value.toPrecision(2);
  }

  function table(headers, rows) {
    var t = el("table");
    var head = el("tr");
    headers.forEach(function (h) { head.appendChild(el("th", {}, h)); });
    t.appendChild(el("thead")).appendChild(head);
    var body = el("tbody");
    rows.forEach(function (cells) {
      var tr = el("tr");
      cells.forEach(function (cell) {
        var td = el("td");
        if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell;
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
    t.appendChild(body);
    return t;
  }

  function bar(percent, cls) {
    var outer = el("span", { "class": cls || "progress", role: "progressbar", "aria-valuenow": percent });
    var inner = el("i");
    inner.style.width = Math.max(0, Math.min(100, percent)) + "%";
    outer.appendChild(inner);
    return outer;
  }

  function withLive(m) {
    var state = live[m.id];
    if (!state) return m;
    return { id: m.id, vm: m.vm, console: m.console, source: m.source, dest: m.dest, mode: m.mode,
      status: state.status || m.status,
      phase: state.phase || m.phase, percent: Math.max(m.percent, state.percent || 0),
      rate_bps: state.rate_bps, eta_seconds: state.eta_seconds };
  }

  function streamFailed(reason) {
    var note = document.getElementById("stream-note");
    note.textContent = "Live progress unavailable (" + reason + "): the bars follow the refresh every " +
      REFRESH_MS / 1000 + " s.";
    note.hidden = false;
  }

  function follow(id) {
    if (!STREAMS || !window.NovaCronStreams || followed[id]) return;
    followed[id] = true;
    window.NovaCronStreams.follow(STREAMS, id, {
      progress: function (state) {
        state.percent = Math.max(state.percent || 0, (live[id] || {}).percent || 0);  // never backwards
        live[id] = state;
        renderMigrations(shown);
      },
      end: function (state) { live[id] = Object.assign({}, live[id], state); renderMigrations(shown); },
      fail: function (reason) { delete live[id]; streamFailed(reason); }
    });
  }

  function renderMigrations(migrations) {
    shown = migrations;
    var box = document.getElementById("migrations");
    box.textContent = "";
    if (!migrations.length) { box.appendChild(el("p", { "class": "empty" }, "No migration is running.")); return; }
    box.appendChild(table(["VM", "from → to", "mode", "status", "progress", "rate", "ETA"], migrations.map(function (row) {
      var m = withLive(row);
      var cell = el("span", { "data-migration": m.id });
      var percent = Math.round(m.percent * 10) / 10;
      cell.appendChild(bar(percent));
      cell.appendChild(document.createTextNode(" " + percent + "%" + (m.phase ? " (" + m.phase + ")" : "")));
      var vm = el("a", { href: m.console, "class": "console" }, m.vm);
      return [vm, m.source + " → " + m.dest, m.mode, m.status, cell,
        m.rate_bps ? fmt(m.rate_bps) + "B/s" : "–", m.eta_seconds ? Math.round(m.eta_seconds) + " s" : "–"];
    })));
    migrations.forEach(function (m) { follow(m.id); });
  }

  function renderAlerts(alerts) {
    var box = document.getElementById("alerts");
    box.textContent = "";
    if (!alerts.length) { box.appendChild(el("p", { "class": "empty" }, "No alert is firing.")); return; }
    box.appendChild(table(["severity", "rule", "subject", "value", "status", "since"], alerts.map(function (a) {
      return [el("span", { "class": "severity-" + a.severity }, a.severity), a.rule, a.subject || "control plane",
        fmt(a.value), a.status, new Date(a.started_at).toLocaleString()];
    })));
  }

  function chart(spec) {
    var box = el("div", { "class": "chart", "data-metric": spec.name });
    var title = el("h2", {}, spec.title);
    var points = spec.points;
    title.appendChild(el("span", { "class": "last" }, points.length ? fmt(points[points.length - 1][1]) : "no data"));
    box.appendChild(title);
    var width = 300, height = 90, pad = 4;
    var svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.setAttribute("preserveAspectRatio", "none");
    if (points.length) {
      var xs = points.map(function (p) { return p[0]; }), ys = points.map(function (p) { return p[1]; });
      var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
      var y1 = Math.max.apply(null, ys.concat([0])) || 1;
      var path = points.map(function (p, i) {
        var x = x1 === x0 ? width / 2 : pad + (p[0] - x0) / (x1 - x0) * (width - 2 * pad);
        var y = height - pad - p[1] / y1 * (height - 2 * pad);
        return (i ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
      }).join(" ");
      var line = document.createElementNS(SVG, "path");
      line.setAttribute("d", path);
      line.setAttribute("fill", "none");
      line.setAttribute("stroke", "#3b82f6");
      line.setAttribute("stroke-width", "2");
      line.setAttribute("vector-effect", "non-scaling-stroke");
      svg.appendChild(line);
    }
    box.appendChild(svg);
    return box;
  }

  function renderCharts(charts) {
    var box = document.getElementById("charts");
    box.textContent = "";
    charts.forEach(function (spec) { box.appendChild(chart(spec)); });
  }

  function renderMeters() {
    Array.prototype.forEach.call(document.querySelectorAll(".meter"), function (meter) {
      var total = Number(meter.dataset.total), used = Number(meter.dataset.used);
      meter.textContent = "";
      var inner = el("i");
      inner.style.width = (total ? Math.min(100, 100 * used / total) : 0) + "%";
      meter.appendChild(inner);
    });
  }

  function render(data) {
    renderMigrations(data.migrations);
    renderAlerts(data.alerts);
    renderCharts(data.charts);
    document.getElementById("updated").textContent = "data of " + new Date(data.generated_at).toLocaleTimeString();
    document.body.setAttribute("data-rendered", "yes");
  }

  function refresh() {
    fetch("data/", { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (data) { if (data) render(data); })
      .catch(function () { /* keep the last picture; try again on the next tick */ });
  }

  renderMeters();
  render(JSON.parse(document.getElementById("dashboard-data").textContent));
  setInterval(refresh, REFRESH_MS);
})();
