// The admin's migration page: its progress bar (with the forecast's ETA and verdict, the verdict's
// reason as the tooltip) follows the migration's event stream; if the stream
// cannot be opened, a note says so and the bar follows GET /api/v1/migrations/{id}/ every 5 s.
(function () {
  "use strict";
  var POLL_MS = 5000;
  var ENDED = ["completed", "failed", "cancelled"];

  // The source's forecast beside the bar: its ETA while known, and a warning when it does not converge.
  function forecast(state) {
    var text = "";
    if (typeof state.eta_seconds === "number") text += ", about " + Math.ceil(state.eta_seconds) + " s left";
    if (state.converging === "no") text += ", not converging";
    return text;
  }

  function show(bar, state) {
    bar.value = Math.max(Number(bar.value), state.percent || 0);
    bar.nextElementSibling.textContent = Math.round(bar.value) + "% " + (state.status || "") +
      (state.phase ? " (" + state.phase + ")" : "") + forecast(state);
    bar.nextElementSibling.title = state.converging_reason || "";
  }

  function poll(bar) {
    var timer = setInterval(function () {
      fetch("/api/v1/migrations/" + encodeURIComponent(bar.dataset.migration) + "/",
        { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (state) {
          if (!state) return;
          show(bar, state);
          if (ENDED.indexOf(state.status) >= 0) clearInterval(timer);
        })
        .catch(function () { /* try again on the next tick */ });
    }, POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(document.querySelectorAll("progress[data-migration]"), function (bar) {
      if (ENDED.indexOf(bar.dataset.status) >= 0) return;
      var base = bar.dataset.streamsUrl ||
        location.protocol + "//" + location.hostname + ":" + bar.dataset.streamsPort;
      window.NovaCronStreams.follow(base.replace(/\/$/, ""), bar.dataset.migration, {
        progress: function (state) { show(bar, state); },
        end: function (state) { show(bar, state); },
        fail: function (reason) {
          var note = bar.parentNode.querySelector(".stream-note");
          note.textContent = "Live progress unavailable (" + reason + "): refreshing every " + POLL_MS / 1000 + " s.";
          note.hidden = false;
          poll(bar);
        }
      });
    });
  });
})();
