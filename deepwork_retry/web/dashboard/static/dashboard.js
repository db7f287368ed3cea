/* The dashboard's live updates: one EventSource on the page's project; each
   message makes htmx re-fetch the page's [data-live] regions (at most about
   once a second). No inline script is needed (the CSP forbids it). */
(function () {
  "use strict";
  var body = document.body;

  /* A request htmx made failed: signed out (401) goes to the login page by a
     reload; anything else is said in the status region, in words. */
  body.addEventListener("htmx:responseError", function (event) {
    var status = event.detail && event.detail.xhr ? event.detail.xhr.status : 0;
    if (status === 401) {
      window.location.reload();
      return;
    }
    var flash = document.getElementById("flash");
    if (flash) {
      flash.textContent =
        "That did not work (HTTP " + status + "). Reload the page and try again.";
    }
  });
  body.addEventListener("htmx:sendError", function () {
    var flash = document.getElementById("flash");
    if (flash) {
      flash.textContent = "The server could not be reached. Check the connection and try again.";
    }
    /* The stream was refused for good and the server is not back yet: ask again. */
    if (body.getAttribute("data-live-state") === "closed" && recheck === null) {
      recheck = window.setTimeout(function () {
        recheck = null;
        refreshRegions();
      }, 5000);
    }
  });
  var recheck = null;

  function refreshRegions() {
    if (!window.htmx) {
      return;
    }
    var regions = document.querySelectorAll("[data-live]");
    for (var i = 0; i < regions.length; i++) {
      window.htmx.trigger(regions[i], "deepwork:refresh");
    }
  }

  /* A live region is replaced whole: a keyboard user focused on a link in it (a task
     of the blocked list) would be sent back to the top of the page. The same link
     in the new content gets the focus back. */
  var refocus = null;
  body.addEventListener("htmx:beforeSwap", function (event) {
    var region = event.detail && event.detail.target;
    var active = document.activeElement;
    refocus = null;
    if (region && region.hasAttribute && region.hasAttribute("data-live") &&
        active && active !== region && region.contains(active) && active.getAttribute("href")) {
      refocus = active.getAttribute("href");
    }
  });
  body.addEventListener("htmx:afterSwap", function () {
    if (refocus === null) {
      return;
    }
    var href = refocus;
    refocus = null;
    var links = document.querySelectorAll("[data-live] a[href]");
    for (var i = 0; i < links.length; i++) {
      if (links[i].getAttribute("href") === href) {
        links[i].focus({ preventScroll: true });
        return;
      }
    }
  });

  var source = body.getAttribute("data-events");
  if (!source || typeof window.EventSource === "undefined") {
    return;
  }
  var THROTTLE = 1000;
  var last = 0;
  var pending = null;

  function refresh() {
    pending = null;
    last = Date.now();
    refreshRegions();
  }

  function schedule() {
    if (pending !== null) {
      return;
    }
    var wait = Math.max(0, last + THROTTLE - Date.now());
    pending = window.setTimeout(refresh, wait);
  }

  /* The stream's state, in words as well as on the body (for the tests and styles). */
  var NOTES = {
    connected: "Live updates on: this page follows the tasks as they change.",
    reconnecting: "Live updates interrupted: reconnecting…",
    closed: "Live updates stopped: reload the page to see changes."
  };
  function setState(state) {
    body.setAttribute("data-live-state", state);
    var note = document.getElementById("live-note");
    if (note && note.textContent !== NOTES[state]) {
      note.textContent = NOTES[state];
    }
  }

  var events = new EventSource(source);
  events.onopen = function () {
    setState("connected");
  };
  events.onerror = function () {
    if (events.readyState !== EventSource.CLOSED) {
      setState("reconnecting");
      return;
    }
    /* Refused for good (an EventSource does not say why): the session may have
       ended (a 401, or a restart with another secret). Fetching the live regions
       once tells: a 401 there reloads the page, to the sign-in page. */
    setState("closed");
    refresh();
  };
  events.onmessage = schedule;
  [
    "progress",
    "task.blocked",
    "task.retried",
    "attempt.started",
    "attempt.succeeded",
    "attempt.failed",
    "attempt.lost",
    "dispatch.failed",
    "dispatch.deferred",
    "project.progress"
  ].forEach(function (name) {
    events.addEventListener(name, schedule);
  });
  window.addEventListener("pagehide", function () {
    events.close();
  });
})();
