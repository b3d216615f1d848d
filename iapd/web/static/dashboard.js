// iapd dashboard: the live alert list (server-sent events) and the per-minute chart.
//
// Every value in an alert is attacker-controlled.  It reaches the page only through
// textContent, or through setAttribute on href/title with URLs built here from our own
// paths and encodeURIComponent: never innerHTML, never a string of markup.  The page's
// Content-Security-Policy forbids inline script and style, so this file is all the
// behaviour there is.
(function () {
  "use strict";

  var SEVERITIES = ["high", "medium", "low", "info"];
  var STACK = ["info", "low", "medium", "high", "other"]; // bottom to top
  var MAX_ROWS = 500;
  var SVG = "http://www.w3.org/2000/svg";

  function el(tag, value, className) {
    var e = document.createElement(tag);
    if (value !== undefined && value !== null) e.textContent = String(value);
    if (className) e.className = className;
    return e;
  }

  function when(iso) {
    return iso ? String(iso).slice(0, 19).replace("T", " ") : "-";
  }

  function addresses(list) {
    list = list || [];
    if (list.length > 3) return list.slice(0, 3).join(", ") + " (+" + (list.length - 3) + ")";
    return list.join(", ") || "-";
  }

  function severityClass(value) {
    return SEVERITIES.indexOf(value) >= 0 ? value : "other";
  }

  function link(href, value) {
    var a = el("a", value);
    a.setAttribute("href", href);
    return a;
  }

  function cell(child) {
    var td = document.createElement("td");
    td.appendChild(child);
    return td;
  }

  // The same row the server renders (iapd/web/pages.py, _alert_row).
  function alertRow(alert) {
    var idmef = alert.idmef || {};
    var tr = document.createElement("tr");
    tr.setAttribute("data-id", String(Number(alert.id)));
    tr.className = "new";
    tr.appendChild(cell(link("/alerts/" + Number(alert.id), Number(alert.id))));
    var received = el("td", when(alert.received));
    received.setAttribute("title", String(alert.received));
    tr.appendChild(received);
    tr.appendChild(cell(link("/alerts?sensor=" + encodeURIComponent(alert.sensor), alert.sensor)));
    tr.appendChild(cell(el("span", idmef.severity || "-", "sev sev-" + severityClass(idmef.severity))));
    var classification = idmef.classification;
    if (classification === undefined || classification === null) {
      classification = idmef.kind === "Heartbeat" ? "(heartbeat)" : alert.idmef ? "-" : "(not IDMEF)";
    }
    tr.appendChild(el("td", classification, "classification"));
    tr.appendChild(el("td", addresses(idmef.source)));
    tr.appendChild(el("td", addresses(idmef.target)));
    tr.appendChild(el("td", (alert.via || []).join(" > ") || "direct"));
    return tr;
  }

  function setStatus(text, state) {
    var status = document.getElementById("status");
    if (status) status.textContent = text;
    document.body.setAttribute("data-live", state);
  }

  function live() {
    var body = document.getElementById("alerts");
    if (!body || !body.getAttribute("data-events")) return;
    if (!window.EventSource) {
      setStatus("this browser cannot show live updates: reload the page", "unsupported");
      return;
    }
    var shown = {};
    for (var i = 0; i < body.rows.length; i++) shown[body.rows[i].getAttribute("data-id")] = true;
    var source = new EventSource(body.getAttribute("data-events"));
    source.onopen = function () {
      setStatus("live: new alerts appear at the top", "open");
    };
    source.onerror = function () {
      setStatus("connection lost; reconnecting...", "reconnecting");
    };
    source.addEventListener("alert", function (event) {
      var alert = JSON.parse(event.data);
      var key = String(Number(alert.id));
      if (shown[key]) return;
      shown[key] = true;
      body.insertBefore(alertRow(alert), body.firstChild);
      while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
      var empty = document.getElementById("empty");
      if (empty) empty.textContent = "";
      chartSoon();
    });
    source.addEventListener("reset", function () {
      // too far behind to catch up event by event: start again from the newest
      source.close();
      window.location.reload();
    });
  }

  // -- the chart: stacked bars of alerts per minute, one colour per severity ---------

  var chartTimer = null;

  function chartSoon() {
    if (chartTimer === null) chartTimer = window.setTimeout(function () { chartTimer = null; chart(); }, 2000);
  }

  function svg(tag, attributes) {
    var e = document.createElementNS(SVG, tag);
    for (var name in attributes) e.setAttribute(name, String(attributes[name]));
    return e;
  }

  function draw(box, stats) {
    var series = stats.series || [];
    var width = 720, height = 170, left = 34, bottom = 20, top = 8;
    var plot = height - bottom - top;
    var step = (width - left) / Math.max(series.length, 1);
    var max = 1;
    series.forEach(function (m) {
      var total = 0;
      STACK.forEach(function (s) { total += m.counts[s] || 0; });
      if (total > max) max = total;
    });
    var chart = svg("svg", { viewBox: "0 0 " + width + " " + height, role: "img", "class": "chart" });
    var label = svg("title", {});
    label.textContent = "Alerts per minute by severity";
    chart.appendChild(label);
    chart.appendChild(svg("line", { x1: left, y1: top + plot, x2: width, y2: top + plot, "class": "axis" }));
    var maxLabel = svg("text", { x: left - 4, y: top + 10, "class": "tick", "text-anchor": "end" });
    maxLabel.textContent = String(max);
    chart.appendChild(maxLabel);
    series.forEach(function (m, i) {
      var y = top + plot;
      var parts = [];
      STACK.forEach(function (s) {
        var n = m.counts[s] || 0;
        if (!n) return;
        var h = (n / max) * plot;
        y -= h;
        chart.appendChild(svg("rect", {
          x: (left + i * step + 1).toFixed(1), y: y.toFixed(1),
          width: Math.max(step - 2, 1).toFixed(1), height: h.toFixed(1), "class": "bar bar-" + s
        }));
        parts.push(n + " " + s);
      });
      var hit = svg("rect", { x: (left + i * step).toFixed(1), y: top, width: step.toFixed(1), height: plot, "class": "hit" });
      var tip = svg("title", {});
      tip.textContent = m.minute.slice(11, 16) + " UTC: " + (parts.join(", ") || "none");
      hit.appendChild(tip);
      chart.appendChild(hit);
    });
    [0, series.length - 1].forEach(function (i) {
      if (i < 0 || !series[i]) return;
      var t = svg("text", { x: (left + i * step + step / 2).toFixed(1), y: height - 5, "class": "tick",
                            "text-anchor": i === 0 ? "start" : "end" });
      t.textContent = series[i].minute.slice(11, 16);
      chart.appendChild(t);
    });
    var legend = el("p", null, "legend");
    STACK.slice().reverse().forEach(function (s) {
      legend.appendChild(el("span", s, "key key-" + s));
    });
    while (box.firstChild) box.removeChild(box.firstChild);
    box.appendChild(chart);
    box.appendChild(legend);
    box.setAttribute("data-drawn", String(Date.now()));
  }

  function chart() {
    var box = document.getElementById("chart");
    if (!box || !box.getAttribute("data-stats") || !window.fetch) return;
    fetch(box.getAttribute("data-stats"), { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (stats) { draw(box, stats); })
      .catch(function (e) { box.textContent = "The chart could not be loaded (" + e.message + ")."; });
  }

  function start() {
    live();
    chart();
    if (document.getElementById("chart")) window.setInterval(chart, 30000);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
