// Follows a migration's events (Server-Sent Events from the streams service, docs/streams.md):
// handlers.progress(state) for each state, handlers.end(final) once it finishes, and
// handlers.fail(reason) once if the stream cannot be opened (the page then falls back to polling).
// Plain JS, no build step; the session cookie goes along (withCredentials; the service allows the
// page's exact origin).
(function () {
  "use strict";

  function follow(base, id, handlers) {
    if (!window.EventSource) { handlers.fail("this browser has no EventSource"); return null; }
    var url = base + "/api/v1/migrations/" + encodeURIComponent(id) + "/events/";
    var source = new EventSource(url, { withCredentials: true });
    var opened = false;
    source.addEventListener("progress", function (event) {
      opened = true;
      handlers.progress(JSON.parse(event.data));
    });
    source.addEventListener("end", function (event) {
      source.close();
      handlers.end(JSON.parse(event.data));
    });
    source.onerror = function () {
      // After it opened, EventSource reconnects by itself (with Last-Event-ID); before, or once the
      // server refused it (401, 404, 429: CLOSED), the page polls instead.
      if (!opened || source.readyState === EventSource.CLOSED) {
        source.close();
        handlers.fail(opened ? "the live stream closed" : "the live stream could not be opened");
      }
    };
    return source;
  }

  window.NovaCronStreams = { follow: follow };
})();
