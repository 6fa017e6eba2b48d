//! The bundled font, so that figures need no system fonts.

use plotters::style::FontStyle;
use std::sync::Once;

/// DejaVu Sans from the workspace's `assets/fonts` (Bitstream Vera license,
/// `assets/fonts/DejaVuSans-LICENSE.txt`).
pub const FONT_TTF: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");

/// The family figures draw text in; the bundled font is registered under this name.
pub const FAMILY: &str = "sans-serif";

static REGISTERED: Once = Once::new();

/// Registers the bundled font as plotters' [`FAMILY`] (once per process).
pub fn ensure_registered() {
    REGISTERED.call_once(|| {
        if plotters::style::register_font(FAMILY, FontStyle::Normal, FONT_TTF).is_err() {
            tracing::warn!("the bundled font could not be registered");
        }
    });
}
