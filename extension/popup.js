import {api, load, save, originOf} from './settings.js';

function show(id, good, text) {
  const item = document.getElementById(id);
  item.textContent = text;
  item.className = good ? 'good' : 'bad';
}

async function currentSite() {
  const [tab] = await api.tabs.query({active: true, lastFocusedWindow: true});
  return originOf(tab?.url);
}

async function render() {
  const [state, settings, site] = await Promise.all([api.runtime.sendMessage({type: 'state'}), load(), currentSite()]);
  show('connected', state.connected, state.connected ? `Agent connected (${state.user}, ${state.version})` : 'Agent not running');
  show('paired', state.paired, state.paired ? 'Paired with this browser' : 'Not paired');
  show('unlocked', state.unlocked, state.unlocked ? 'Key unlocked' : 'Key locked');
  document.getElementById('message').textContent = state.message || '';
  const toggle = document.getElementById('site-on');
  if (!site) {
    document.getElementById('site').textContent = 'This page';
    document.getElementById('protected-count').textContent = 'Uploads are not possible here.';
    toggle.disabled = true;
    return;
  }
  document.getElementById('site').textContent = site;
  const protectedHere = settings.protectedCounts[site] || 0;
  document.getElementById('protected-count').textContent =
    `${protectedHere} photo${protectedHere === 1 ? '' : 's'} protected on this site.`;
  const unprotected = settings.unprotectedCounts[site] || 0;
  const warning = document.getElementById('unprotected-count');
  warning.hidden = unprotected === 0;
  warning.textContent = `${unprotected} photo${unprotected === 1 ? '' : 's'} went through unprotected (the agent could not protect ${unprotected === 1 ? 'it' : 'them'}).`;
  toggle.checked = !settings.offSites.includes(site);
  toggle.onchange = async () => {
    const offSites = (await load()).offSites.filter((s) => s !== site);
    if (!toggle.checked) offSites.push(site);
    await save({offSites});
  };
}

render();
