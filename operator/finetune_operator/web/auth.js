// The pages' data comes from an API that Kubernetes' own authorization guards: every request
// carries a bearer token (one from `kubectl create token ACCOUNT --audience finetune-web` where
// the page has an audience of its own, as the chart's has; else your kubeconfig's), and the
// operator asks the apiserver whether its holder may list FineTuneJobs in the namespace shown.
// The token stays in this tab's session storage; an address ending in #token=... sets it.
const TOKEN_KEY = "finetune-token";

(function tokenFromAddress() {
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("token")) {
    sessionStorage.setItem(TOKEN_KEY, hash.get("token"));
    history.replaceState(null, "", location.pathname + location.search);
  }
})();

function bearer() {
  const token = sessionStorage.getItem(TOKEN_KEY) || "";
  return token ? {Authorization: "Bearer " + token} : {};
}

class Refused extends Error {}

async function apiFetch(path) {
  const response = await fetch(path, {cache: "no-store", headers: bearer()});
  if (response.status === 401 || response.status === 403) {
    let message = "";
    try { message = (await response.json()).message || ""; } catch (e) { /* not JSON */ }
    showLogin(message || "Sign in with a bearer token.");
    throw new Refused(message);
  }
  hideLogin();
  return response;
}

// Thumbnails come through apiFetch too (an <img src> cannot send the token): each is fetched
// once and shown from a blob: URL.
const thumbnailURLs = new Map();
async function thumbnailURL(path) {
  if (!thumbnailURLs.has(path)) {
    if (thumbnailURLs.size > 200) {
      for (const url of thumbnailURLs.values()) URL.revokeObjectURL(url);
      thumbnailURLs.clear();
    }
    const response = await apiFetch(path);
    if (!response.ok) return "";
    thumbnailURLs.set(path, URL.createObjectURL(await response.blob()));
  }
  return thumbnailURLs.get(path);
}

function showLogin(message) {
  let form = document.getElementById("login");
  if (!form) {
    form = document.createElement("form");
    form.id = "login";
    const input = document.createElement("input");
    input.type = "password";
    input.id = "token";
    input.placeholder = "bearer token";
    input.autocomplete = "off";
    const button = document.createElement("button");
    button.type = "submit";
    button.textContent = "Show jobs";
    const note = document.createElement("div");
    note.id = "login-message";
    note.className = "muted";
    form.append(input, button, note);
    form.addEventListener("submit", event => {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      input.value = "";
      if (typeof refresh === "function") refresh();
    });
    document.body.insertBefore(form, document.body.firstChild);
  }
  document.getElementById("login-message").textContent =
    message + " The cluster decides what you see: use a token that may list FineTuneJobs here.";
  form.hidden = false;
}

function hideLogin() {
  const form = document.getElementById("login");
  if (form) form.hidden = true;
}
