import {api, load, save, originOf} from './settings.js';

const $ = (id) => document.getElementById(id);

async function renderState() {
  const state = await api.runtime.sendMessage({type: 'state'});
  for (const [id, good, text] of [
    ['connected', state.connected, state.connected ? `Agent connected at ${state.agentUrl}` : `No agent at ${state.agentUrl}`],
    ['paired', state.paired, state.paired ? 'Paired' : 'Not paired'],
  ]) {
    $(id).textContent = text;
    $(id).className = good ? 'good' : 'bad';
  }
}

async function render() {
  const settings = await load();
  $('agent-url').value = settings.agentUrl;
  $('strength').value = settings.strength;
  document.querySelector(`input[name=on-failure][value=${settings.onFailure}]`).checked = true;
  $('off-sites').value = settings.offSites.join('\n');
  await renderState();
}

$('save').onclick = async () => {
  const lines = $('off-sites').value.split('\n').map((line) => line.trim()).filter(Boolean);
  const offSites = lines.map(originOf);
  const bad = lines.filter((_, i) => !offSites[i]);
  const agentUrl = originOf($('agent-url').value.trim()) ? $('agent-url').value.trim() : null;
  if (bad.length || !agentUrl) {
    $('saved').textContent = bad.length ? `Not a site address: ${bad.join(', ')}` : 'The agent address must be a URL such as http://127.0.0.1:47830';
    return;
  }
  await save({
    agentUrl,
    strength: $('strength').value,
    onFailure: document.querySelector('input[name=on-failure]:checked').value,
    offSites: [...new Set(offSites)],
  });
  $('saved').textContent = 'Saved.';
  await renderState();
};

$('pair').onclick = async () => {
  const code = $('code').value.trim();
  if (!code) {
    $('pair-result').textContent = 'Enter the code that `agent pair` printed.';
    return;
  }
  const result = await api.runtime.sendMessage({type: 'pair', code});
  $('pair-result').textContent = result.ok ? 'Paired: this browser\'s uploads are now protected.' : result.message;
  if (result.ok) $('code').value = '';
  await renderState();
};

$('unpair').onclick = async () => {
  await api.runtime.sendMessage({type: 'unpair'});
  $('pair-result').textContent = 'Unpaired.';
  await renderState();
};

render();
