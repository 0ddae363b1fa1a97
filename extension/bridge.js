// The extension's side of the page: carries page.js's photos to the background worker (which
// talks to the agent) and, when a photo cannot be protected, asks the user what to do in a notice
// the page's scripts cannot press for them (only trusted clicks count).
(() => {
  'use strict';
  const api = globalThis.browser ?? globalThis.chrome;
  let port = null;

  window.addEventListener('message', (event) => {
    if (port || event.source !== window || event.data?.type !== 'rgan-agent:hello' || event.ports.length !== 1) return;
    port = event.ports[0];
    port.onmessage = (message) => handle(message.data).then((reply) => port.postMessage(reply));
  });

  function toBase64(buffer) {
    const bytes = new Uint8Array(buffer);
    let text = '';
    for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    return btoa(text);
  }

  function fromBase64(text) {
    return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  }

  async function protectOne(file, site) {
    const data = toBase64(await file.blob.arrayBuffer());
    try {
      return await api.runtime.sendMessage({type: 'protect', site, name: file.name, mime: file.type, data});
    } catch (error) {
      return {ok: false, code: 'extension_error', message: String(error.message || error), onFailure: 'block'};
    }
  }

  async function handle({id, site, files}) {
    const results = await Promise.all(files.map((file) => protectOne(file, site)));
    if (results.every((r) => r.ok)) {
      return {id, outcome: 'protected', files: results.map((r) => ({type: r.mime, blob: new Blob([fromBase64(r.data)], {type: r.mime})}))};
    }
    const failed = results.find((r) => !r.ok);
    if (failed.code === 'site_off') return {id, outcome: 'original'};
    let outcome = 'original';
    if (failed.onFailure !== 'allow') outcome = await askUser(files.length, failed.message);
    if (outcome === 'original') api.runtime.sendMessage({type: 'unprotected', site, count: files.length}).catch(() => {});
    return {id, outcome};
  }

  const NOTICE_STYLE = `
    :host { all: initial; }
    .box { position: fixed; z-index: 2147483647; right: 16px; bottom: 16px; max-width: 380px;
      font: 14px/1.4 system-ui, sans-serif; color: #1d1d1f; background: #fff; border: 1px solid #d0d0d7;
      border-left: 4px solid #c0392b; border-radius: 8px; box-shadow: 0 6px 24px rgba(0,0,0,.18); padding: 14px 16px; }
    h1 { font-size: 15px; margin: 0 0 6px; }
    p { margin: 0 0 12px; }
    .why { color: #55555c; font-size: 13px; }
    button { font: inherit; padding: 6px 12px; border-radius: 6px; border: 1px solid #b0b0b8; background: #f4f4f6; cursor: pointer; }
    button.stop { background: #1d1d1f; color: #fff; border-color: #1d1d1f; margin-left: 8px; }`;

  // Resolves to 'original' (upload unprotected this once) or 'cancel'.
  function askUser(count, reason) {
    return new Promise((resolve) => {
      const host = document.createElement('rgan-agent-notice');
      const root = host.attachShadow({mode: 'open'});
      const style = document.createElement('style');
      style.textContent = NOTICE_STYLE;
      const box = document.createElement('div');
      box.className = 'box';
      box.setAttribute('role', 'alertdialog');
      const title = document.createElement('h1');
      title.textContent = count === 1 ? 'This photo was not uploaded' : `These ${count} photos were not uploaded`;
      const text = document.createElement('p');
      text.textContent = 'rgan-agent could not protect it, so nothing was sent.';
      const why = document.createElement('p');
      why.className = 'why';
      why.textContent = reason;
      const once = document.createElement('button');
      once.className = 'once';
      once.textContent = 'Upload unprotected this once';
      const stop = document.createElement('button');
      stop.className = 'stop';
      stop.textContent = "Don't upload";
      box.append(title, text, why, once, stop);
      root.append(style, box);
      const choose = (outcome) => (event) => {
        if (!event.isTrusted) return;  // a page script clicking for the user
        host.remove();
        resolve(outcome);
      };
      once.addEventListener('click', choose('original'));
      stop.addEventListener('click', choose('cancel'));
      (document.body || document.documentElement).append(host);
    });
  }
})();
