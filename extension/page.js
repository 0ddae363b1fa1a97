// Runs in the page's own JavaScript world at document_start, before any script of the page, so
// every way a page can take a photo from the user passes through here first: file inputs, drag and
// drop, paste, and scripted uploads (fetch, XMLHttpRequest, form.submit()). The photos are
// protected by the agent through bridge.js (the extension's isolated world); the page only ever
// receives the protected files, with the original name and type.
(() => {
  'use strict';
  if (window.__rganAgentPage) return;
  Object.defineProperty(window, '__rganAgentPage', {value: true});

  // The page may replace these later; we must keep calling the browser's own.
  const nativeFetch = window.fetch;
  const nativeSend = XMLHttpRequest.prototype.send;
  const nativeAbort = XMLHttpRequest.prototype.abort;
  const nativeSubmit = HTMLFormElement.prototype.submit;
  const nativeRequestSubmit = HTMLFormElement.prototype.requestSubmit;

  const IMAGE_NAME = /\.(jpe?g|png|webp|heic|heif|avif|bmp|tiff?|gif)$/i;
  // Files that came out of (or were let through by) the agent, and the events we dispatch
  // ourselves: neither is intercepted twice. A DataTransfer hands out new File objects for the
  // files put in it, so files are also known by a fingerprint of their bytes.
  const ours = new WeakSet();
  const fingerprints = new Set();
  // an original the user let through is let through for the upload under way, not for good
  const allowedUntil = new Map();
  const ALLOW_FOR_MS = 60_000;
  const pendingInputs = new WeakMap();

  // A private channel to bridge.js: the first hello a content script sees is this one, because
  // it is posted before any page script runs.
  const channel = new MessageChannel();
  const replies = new Map();
  let nextId = 1;
  channel.port1.onmessage = (event) => {
    const resolve = replies.get(event.data.id);
    replies.delete(event.data.id);
    if (resolve) resolve(event.data);
  };
  window.postMessage({type: 'rgan-agent:hello'}, '*', [channel.port2]);

  function ask(blobs) {
    return new Promise((resolve) => {
      const id = nextId++;
      replies.set(id, resolve);
      channel.port1.postMessage({
        id,
        site: location.origin,
        files: blobs.map((blob) => ({name: blob instanceof File ? blob.name : '', type: blob.type, blob})),
      });
    });
  }

  function isPhoto(value) {
    if (!(value instanceof Blob) || ours.has(value)) return false;
    if (value.type === 'image/svg+xml') return false;  // a drawing, not a photo
    if (value.type.startsWith('image/')) return true;
    return !value.type && value instanceof File && IMAGE_NAME.test(value.name);
  }

  // Not cryptographic (crypto.subtle exists only on https pages): it tells our own outputs apart
  // from other photos, and a page that wanted to send an original could do so anyway.
  async function fingerprint(blob) {
    const bytes = new Uint8Array(await blob.arrayBuffer());
    let fnv = 0x811c9dc5;
    let djb = 5381;
    for (let i = 0; i < bytes.length; i++) {
      fnv = Math.imul(fnv ^ bytes[i], 0x01000193);
      djb = (Math.imul(djb, 33) + bytes[i]) | 0;
    }
    return `${bytes.length}:${fnv >>> 0}:${djb >>> 0}:${blob.type}`;
  }

  async function remember(blob, outcome) {
    ours.add(blob);
    const print = await fingerprint(blob);
    if (outcome === 'protected') fingerprints.add(print);
    else allowedUntil.set(print, Date.now() + ALLOW_FOR_MS);
  }

  function isKnown(print) {
    return fingerprints.has(print) || (allowedUntil.get(print) ?? 0) > Date.now();
  }

  // -> {outcome: 'none' | 'protected' | 'original' | 'cancel', files}
  async function protectAll(values) {
    const candidates = values.filter(isPhoto);
    const known = await Promise.all(candidates.map(async (blob) => isKnown(await fingerprint(blob))));
    candidates.forEach((blob, i) => known[i] && ours.add(blob));
    const photos = candidates.filter((_, i) => !known[i]);
    if (!photos.length) return {outcome: 'none', files: values};
    const reply = await ask(photos);
    if (reply.outcome === 'cancel') return {outcome: 'cancel', files: values};
    const replaced = new Map();
    await Promise.all(photos.map(async (photo, i) => {
      let out = photo;
      if (reply.outcome === 'protected') {
        const {blob} = reply.files[i];
        const type = photo.type || blob.type;
        out = photo instanceof File
          ? new File([blob], photo.name, {type, lastModified: photo.lastModified})
          : new Blob([blob], {type});
      }
      await remember(out, reply.outcome);
      replaced.set(photo, out);
    }));
    return {outcome: reply.outcome, files: values.map((value) => replaced.get(value) ?? value)};
  }

  function dataTransferOf(files, strings = []) {
    const transfer = new DataTransfer();
    for (const [type, value] of strings) transfer.setData(type, value);
    for (const file of files) transfer.items.add(file);
    return transfer;
  }

  function dispatchOurs(target, event) {
    ours.add(event);
    target.dispatchEvent(event);
  }

  // File inputs: hold back the input and change events until the files are swapped.
  function onFileInputEvent(event) {
    const input = event.target;
    if (ours.has(event) || !(input instanceof HTMLInputElement) || input.type !== 'file') return;
    if (pendingInputs.has(input)) {
      event.stopImmediatePropagation();
      return;
    }
    const files = [...(input.files || [])];
    if (!files.some(isPhoto)) return;
    event.stopImmediatePropagation();
    const job = protectAll(files).then(({outcome, files: out}) => {
      pendingInputs.delete(input);
      if (outcome === 'cancel') {
        input.value = '';
        return;
      }
      input.files = dataTransferOf(out).files;
      dispatchOurs(input, new Event('input', {bubbles: true, composed: true}));
      dispatchOurs(input, new Event('change', {bubbles: true}));
    });
    pendingInputs.set(input, job);
  }
  window.addEventListener('input', onFileInputEvent, true);
  window.addEventListener('change', onFileInputEvent, true);

  function pendingIn(form) {
    return [...form.querySelectorAll('input[type=file]')].map((i) => pendingInputs.get(i)).filter(Boolean);
  }

  // A form must not be sent while one of its file inputs still holds the originals.
  window.addEventListener('submit', (event) => {
    const form = event.target;
    if (ours.has(event) || !(form instanceof HTMLFormElement)) return;
    const waits = pendingIn(form);
    if (!waits.length) return;
    event.preventDefault();
    event.stopImmediatePropagation();
    const submitter = event.submitter;
    Promise.all(waits).then(() => nativeRequestSubmit.call(form, submitter ?? undefined));
  }, true);
  HTMLFormElement.prototype.submit = function submit() {
    const waits = pendingIn(this);
    if (!waits.length) return nativeSubmit.call(this);
    Promise.all(waits).then(() => nativeSubmit.call(this));
  };

  function eventInit(event) {
    const init = {bubbles: true, cancelable: true, composed: true};
    for (const key of ['clientX', 'clientY', 'screenX', 'screenY', 'ctrlKey', 'shiftKey', 'altKey', 'metaKey']) {
      if (key in event) init[key] = event[key];
    }
    return init;
  }

  // Drag and drop: the browser's DataTransfer cannot be changed, so the drop is replayed with one
  // that holds the protected files.
  window.addEventListener('drop', (event) => {
    if (ours.has(event) || !event.dataTransfer) return;
    const files = [...event.dataTransfer.files];
    if (!files.some(isPhoto)) return;
    event.preventDefault();
    event.stopImmediatePropagation();
    const target = event.target;
    const init = eventInit(event);
    protectAll(files).then(({outcome, files: out}) => {
      if (outcome === 'cancel') return;
      dispatchOurs(target, new DragEvent('drop', {...init, dataTransfer: dataTransferOf(out)}));
    });
  }, true);

  window.addEventListener('paste', (event) => {
    if (ours.has(event) || !event.clipboardData) return;
    const data = event.clipboardData;
    const files = [...data.files];
    if (!files.some(isPhoto)) return;
    event.preventDefault();
    event.stopImmediatePropagation();
    const strings = [...data.types].filter((type) => type !== 'Files').map((type) => [type, data.getData(type)]);
    const target = event.target;
    protectAll(files).then(({outcome, files: out}) => {
      if (outcome === 'cancel') return;
      const init = {bubbles: true, cancelable: true, composed: true, clipboardData: dataTransferOf(out, strings)};
      dispatchOurs(target, new ClipboardEvent('paste', init));
    });
  }, true);

  // Scripted uploads: a Blob/File body, or a FormData holding one.
  function carriesPhoto(body) {
    if (body instanceof Blob) return isPhoto(body);
    if (body instanceof FormData) return [...body.values()].some(isPhoto);
    return false;
  }

  async function protectBody(body) {
    if (body instanceof Blob) {
      const {outcome, files} = await protectAll([body]);
      return {outcome, body: files[0]};
    }
    const entries = [...body.entries()];
    const {outcome, files} = await protectAll(entries.map(([, value]) => value));
    const form = new FormData();
    entries.forEach(([name], i) => {
      const value = files[i];
      if (value instanceof File) form.append(name, value, value.name);
      else form.append(name, value);
    });
    return {outcome, body: form};
  }

  const STOPPED = 'Upload stopped by rgan-agent: the photo could not be protected';

  async function requestBody(request) {
    const type = request.headers.get('content-type') || '';
    if (type.startsWith('multipart/form-data')) return request.clone().formData();
    if (type.startsWith('image/')) return request.clone().blob();
    return null;
  }

  window.fetch = async function fetch(input, init) {
    let body = init && init.body;
    let request = null;
    if (body === undefined && input instanceof Request && !['GET', 'HEAD'].includes(input.method)) {
      request = input;
      body = await requestBody(input);
    }
    if (!carriesPhoto(body)) return nativeFetch.call(this, input, init);
    const result = await protectBody(body);
    if (result.outcome === 'cancel') throw new TypeError(STOPPED);
    if (request) {
      const headers = new Headers(request.headers);
      if (result.body instanceof FormData) headers.delete('content-type');  // a new boundary
      return nativeFetch.call(this, new Request(request, {body: result.body, headers, duplex: 'half'}), init);
    }
    const headers = new Headers((init && init.headers) || undefined);
    if (result.body instanceof FormData) headers.delete('content-type');
    return nativeFetch.call(this, input, {...init, body: result.body, headers});
  };

  XMLHttpRequest.prototype.send = function send(body) {
    if (!carriesPhoto(body)) return nativeSend.call(this, body);
    protectBody(body).then((result) => {
      if (result.outcome !== 'cancel') {
        nativeSend.call(this, result.body);
        return;
      }
      nativeAbort.call(this);
      for (const type of ['error', 'loadend']) this.dispatchEvent(new ProgressEvent(type));
    });
  };
})();
