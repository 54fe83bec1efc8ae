// Steward console: keeps a live page current. The server sends an event on /ui/events when
// something the page may show has changed; the page is fetched again and its live part
// (banner, alerts, main content) swapped in. Everything works without this script: it only
// saves a reload.
(function () {
  "use strict";
  var body = document.body;
  if (!body || body.getAttribute("data-live") !== "1" || !window.EventSource || !window.fetch) {
    return;
  }
  var busy = false;
  var pending = false;

  // A person typing in a form of the live part must not lose what they typed.
  function editing(live) {
    var a = document.activeElement;
    if (a && live.contains(a) && /^(INPUT|SELECT|TEXTAREA)$/.test(a.tagName)) {
      return true;
    }
    var fields = live.querySelectorAll("input:not([type=hidden]), textarea");
    for (var i = 0; i < fields.length; i++) {
      if (fields[i].value !== fields[i].defaultValue) {
        return true;
      }
    }
    var options = live.querySelectorAll("option");
    for (var j = 0; j < options.length; j++) {
      if (options[j].selected !== options[j].defaultSelected) {
        return true;
      }
    }
    return false;
  }

  function swap(html) {
    var live = document.getElementById("live");
    var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("live");
    if (!live || !fresh) {
      return;
    }
    // Typed into while the page was being fetched: keep it, refresh later.
    if (editing(live)) {
      pending = true;
      return;
    }
    var focused = document.activeElement && live.contains(document.activeElement)
      ? document.activeElement.id : "";
    var open = [];
    live.querySelectorAll("details[open] > summary").forEach(function (s) {
      open.push(s.textContent);
    });
    live.innerHTML = fresh.innerHTML;
    live.querySelectorAll("details > summary").forEach(function (s) {
      if (open.indexOf(s.textContent) >= 0) {
        s.parentElement.open = true;
      }
    });
    if (focused) {
      var el = document.getElementById(focused);
      if (el) {
        el.focus();
      }
    }
  }

  function refresh() {
    var live = document.getElementById("live");
    if (busy || (live && editing(live))) {
      pending = true;
      return;
    }
    busy = true;
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) {
        if (r.redirected) {
          // Signed out (a revoked token): show the sign-in page.
          window.location.reload();
          return null;
        }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html) {
          swap(html);
        }
      })
      .catch(function () {})
      .then(function () {
        busy = false;
        if (pending) {
          pending = false;
          window.setTimeout(refresh, 200);
        }
      });
  }

  document.addEventListener("focusout", function () {
    if (pending) {
      window.setTimeout(refresh, 200);
    }
  });
  var events = null;
  function listen(fresh) {
    events = new EventSource("/ui/events");
    events.addEventListener("change", refresh);
    // After a reconnection, what changed meanwhile was not announced: look now. (The page
    // was just loaded the first time the stream opens.)
    events.addEventListener("open", function () {
      if (fresh) {
        fresh = false;
      } else {
        refresh();
      }
    });
  }
  listen(true);
  // A browser allows few connections per server: the stream ends with the page, and starts
  // again if the page comes back from the back/forward cache.
  window.addEventListener("pagehide", function () {
    events.close();
  });
  window.addEventListener("pageshow", function (e) {
    if (e.persisted) {
      listen(false);
    }
  });
})();
