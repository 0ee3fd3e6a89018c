//! The terminal event loop: set the terminal up, start the client, then draw the state, read keys
//! and resizes, apply daemon actions and ticks, and hand the commands [`update`] returns to the
//! client. Nothing in the loop waits on the daemon. The terminal is restored on the way out, also
//! after a panic (ratatui's hook).

use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event as TermEvent};
use ratatui::DefaultTerminal;

use super::action::{update, Action};
use super::client::{self, ClientHandle, ClientSettings};
use super::state::AppState;
use super::{view, TuiError, TuiOptions};

/// Time between ticks.
pub const TICK: Duration = Duration::from_millis(100);
/// Most daemon actions applied between two frames (the rest wait for the next frame).
const ACTIONS_PER_FRAME: usize = 256;

/// Run the UI until the user quits.
pub fn run(options: TuiOptions) -> Result<(), TuiError> {
    let (tx, rx) = channel();
    let client = client::spawn(
        ClientSettings {
            socket: options.socket.clone(),
            stability_secs: options.config.daemon.stability_secs,
            name: format!("pairstyle-tui {}", env!("CARGO_PKG_VERSION")),
        },
        tx,
    )?;
    let mut state = AppState::new(
        &options.config,
        options.socket.display().to_string(),
        options.embedded,
    );
    let mut terminal = ratatui::try_init().map_err(TuiError::Terminal)?;
    // Asked once, in raw mode and before any event is read (the answer arrives on stdin).
    state.graphics = super::graphics::detect(options.config.tui.graphics);
    let result = event_loop(&mut terminal, &mut state, &client, &rx);
    let restored = ratatui::try_restore().map_err(TuiError::Terminal);
    drop(client);
    result.and(restored)
}

fn apply(state: &mut AppState, client: &ClientHandle, action: Action) {
    for command in update(state, action) {
        client.send(command);
    }
}

fn event_loop(
    terminal: &mut DefaultTerminal,
    state: &mut AppState,
    client: &ClientHandle,
    actions: &Receiver<Action>,
) -> Result<(), TuiError> {
    let size = terminal.size().map_err(TuiError::Terminal)?;
    apply(state, client, Action::Resize(size.width, size.height));
    let mut last_tick = Instant::now();
    while !state.quit {
        terminal
            .draw(|f| view::draw(f, state))
            .map_err(TuiError::Terminal)?;
        let wait = TICK.saturating_sub(last_tick.elapsed());
        if event::poll(wait).map_err(TuiError::Terminal)? {
            match event::read().map_err(TuiError::Terminal)? {
                TermEvent::Key(k) => apply(state, client, Action::Key(k)),
                TermEvent::Resize(w, h) => {
                    terminal.autoresize().map_err(TuiError::Terminal)?;
                    apply(state, client, Action::Resize(w, h));
                }
                _ => {}
            }
        }
        for action in actions.try_iter().take(ACTIONS_PER_FRAME) {
            apply(state, client, action);
        }
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            apply(state, client, Action::Tick);
        }
    }
    Ok(())
}
