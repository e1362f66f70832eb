// The console page: xterm.js on a VM's serial console. Asks the REST API for a ticket (session
// cookie + CSRF token, acting in the VM's project), opens the WebSocket the answer names, writes its
// binary messages (console output: scrollback first, then live) to the terminal and sends what the
// user types as bytes, at most MAX_INPUT_BYTES per message. Text messages are status events
// (connected, reconnecting, closed) shown on the status line; after a close, "Reconnect" asks for a
// new ticket. The terminal is window.novacronConsole.terminal, the statuses shown are its .statuses
// (tests read both). No build step.
(function () {
  "use strict";
  var MAX_INPUT_BYTES = 4096;  // the server closes with 1009 on a larger input message
  var CLOSE_REASONS = {
    1000: "the console was closed",
    1006: "the connection was lost",
    1009: "an input message was too large",
    1011: "the VM's node is unreachable",
    4401: "the console ticket was refused (expired, already used or not for this VM)",
    4404: "the VM is gone",
    4429: "too many consoles are open"
  };
  var page = JSON.parse(document.getElementById("console-data").textContent);
  var csrfToken = document.querySelector('meta[name="csrf-token"]').getAttribute("content");
  var stateBox = document.getElementById("state");
  var nodeBox = document.getElementById("node");
  var reasonBox = document.getElementById("reason");
  var reconnectButton = document.getElementById("reconnect");
  var encoder = new TextEncoder();
  var socket = null;
  var closedReason = "";  // the reason of a "closed" event, told before the socket closes

  var terminal = new Terminal({ cursorBlink: true, scrollback: 10000, convertEol: false });
  var fit = new FitAddon.FitAddon();
  terminal.loadAddon(fit);
  terminal.open(document.getElementById("terminal"));
  fit.fit();
  window.addEventListener("resize", function () { fit.fit(); });

  var shown = [];  // every status shown, in order: [state, reason] (tests read it)

  function show(state, reason) {
    shown.push([state, reason || ""]);
    document.body.setAttribute("data-state", state);
    stateBox.textContent = state;
    reasonBox.textContent = reason || "";
    reconnectButton.hidden = state !== "closed";
  }

  function sendBytes(bytes) {
    if (socket === null || socket.readyState !== WebSocket.OPEN) return;
    for (var start = 0; start < bytes.length; start += MAX_INPUT_BYTES) {
      socket.send(bytes.subarray(start, start + MAX_INPUT_BYTES));
    }
  }

  terminal.onData(function (text) { sendBytes(encoder.encode(text)); });
  terminal.onBinary(function (binary) {  // some mouse reports: one byte per character
    var bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i) & 0xff;
    sendBytes(bytes);
  });

  function onEvent(message) {
    if (message.event === "connected") {
      if (message.node) nodeBox.textContent = message.node;
      show("connected", "");
    } else if (message.event === "reconnecting") {  // the server drops input until "connected"
      show("reconnecting", (message.reason ? message.reason + "; " : "") + "typing resumes once connected");
    } else if (message.event === "closed") {
      closedReason = message.reason || "";
    }
  }

  function open(ticket) {
    var ws = new WebSocket(ticket.url);
    ws.binaryType = "arraybuffer";
    socket = ws;
    closedReason = "";
    terminal.reset();  // the server sends the scrollback again
    ws.onmessage = function (event) {
      if (typeof event.data === "string") {
        onEvent(JSON.parse(event.data));
      } else {
        terminal.write(new Uint8Array(event.data));
      }
    };
    ws.onclose = function (event) {
      if (socket !== ws) return;
      socket = null;
      var known = CLOSE_REASONS[event.code] || "the connection closed (code " + event.code + ")";
      show("closed", closedReason || event.reason || known);
    };
    terminal.focus();
  }

  function refusal(status, body) {
    var detail = body && (body.detail || (body.error && body.error.message));
    return detail || "the console could not be opened (HTTP " + status + ")";
  }

  function connect() {
    show("connecting", "");
    fetch(page.ticket_url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Accept": "application/json", "X-CSRFToken": csrfToken, "X-Project": String(page.project) }
    }).then(function (response) {
      return response.json().catch(function () { return null; }).then(function (body) {
        if (!response.ok) throw new Error(refusal(response.status, body));
        return body;
      });
    }).then(open).catch(function (error) { show("closed", error.message); });
  }

  reconnectButton.addEventListener("click", connect);
  window.novacronConsole = {
    terminal: terminal,
    statuses: shown,
    // The terminal's whole buffer as text, one line per row (what tests read).
    text: function () {
      var buffer = terminal.buffer.active;
      var lines = [];
      for (var row = 0; row < buffer.length; row++) lines.push(buffer.getLine(row).translateToString(true));
      return lines.join("\n");
    }
  };
  connect();
}());
