//! QR rendering of claim codes: Unicode half blocks for terminals and
//! grayscale PNG files. Error correction level M throughout.

use std::io::BufWriter;
use std::path::{Path, PathBuf};

use qrcode::{Color, EcLevel, QrCode};

/// Quiet zone around the terminal rendering, in modules.
const TERMINAL_QUIET: usize = 2;
/// Quiet zone around the PNG rendering, in modules.
const PNG_QUIET: usize = 4;
/// Largest PNG side accepted, in pixels.
const MAX_PNG_SIDE: usize = 16_384;

/// Errors raised while rendering a QR code.
#[derive(Debug, thiserror::Error)]
pub enum QrError {
    /// The text does not fit in a QR code.
    #[error("cannot encode text as a QR code: {0}")]
    Encode(#[from] qrcode::types::QrError),
    /// The scale is zero or makes the image too large.
    #[error(
        "invalid PNG scale {0}: must be at least 1 and keep the image within {MAX_PNG_SIDE} px"
    )]
    Scale(u32),
    /// The PNG file could not be written.
    #[error("cannot write PNG {path}: {source}")]
    Io {
        /// The output file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The PNG encoder failed.
    #[error("cannot encode PNG {path}: {source}")]
    Png {
        /// The output file.
        path: PathBuf,
        /// The encoder error.
        source: png::EncodingError,
    },
}

/// The code's modules as a square grid (`true` = dark) with a quiet zone.
struct Grid {
    side: usize,
    dark: Vec<bool>,
}

impl Grid {
    fn new(text: &str, quiet: usize) -> Result<Self, QrError> {
        let code = QrCode::with_error_correction_level(text.as_bytes(), EcLevel::M)?;
        let width = code.width();
        let colors = code.to_colors();
        let side = width + 2 * quiet;
        let mut dark = vec![false; side * side];
        for (i, color) in colors.iter().enumerate() {
            let (y, x) = (i / width, i % width);
            dark[(y + quiet) * side + x + quiet] = *color == Color::Dark;
        }
        Ok(Grid { side, dark })
    }

    /// Whether the module at (x, y) is light; outside the grid counts as not light.
    fn light(&self, x: usize, y: usize) -> bool {
        x < self.side && y < self.side && !self.dark[y * self.side + x]
    }
}

/// Renders `text` as a QR code for a terminal, two module rows per line.
///
/// Terminals are usually light text on a dark background, so the glyphs
/// draw the *light* modules (and the 2-module quiet zone) and the dark
/// modules are left as background: the result reads as dark-on-light, which
/// is what phone scanners expect. On a light-background terminal the image
/// appears inverted (many, but not all, scanners still read it).
pub fn render_terminal(text: &str) -> Result<String, QrError> {
    let grid = Grid::new(text, TERMINAL_QUIET)?;
    let mut out = String::with_capacity((grid.side + 1) * grid.side.div_ceil(2) * 3);
    for y in (0..grid.side).step_by(2) {
        for x in 0..grid.side {
            out.push(match (grid.light(x, y), grid.light(x, y + 1)) {
                (true, true) => '█',
                (true, false) => '▀',
                (false, true) => '▄',
                (false, false) => ' ',
            });
        }
        out.push('\n');
    }
    Ok(out)
}

/// Writes `text` as an 8-bit grayscale PNG, `scale` pixels per module,
/// with a 4-module quiet zone. Overwrites `path` if it exists.
pub fn write_png(text: &str, path: &Path, scale: u32) -> Result<(), QrError> {
    let grid = Grid::new(text, PNG_QUIET)?;
    let scale_px = scale as usize;
    let px = grid.side.saturating_mul(scale_px);
    if scale == 0 || px > MAX_PNG_SIDE {
        return Err(QrError::Scale(scale));
    }
    let mut pixels = Vec::with_capacity(px * px);
    for y in 0..px {
        for x in 0..px {
            let light = grid.light(x / scale_px, y / scale_px);
            pixels.push(if light { 0xff } else { 0x00 });
        }
    }
    let io = |source| QrError::Io {
        path: path.to_path_buf(),
        source,
    };
    let enc = |source| QrError::Png {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::create(path).map_err(io)?;
    // `px` is at most MAX_PNG_SIDE, so it fits in u32.
    let side = u32::try_from(px).map_err(|_| QrError::Scale(scale))?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), side, side);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(enc)?;
    writer.write_image_data(&pixels).map_err(enc)?;
    writer.finish().map_err(enc)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CODE: &str = "LOBBY1:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad:SEHMGOHWJCJN7QBIRY2DCYXJSY";

    #[test]
    fn terminal_rendering_is_square_ish() {
        let out = render_terminal(CODE).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert!(!lines.is_empty());
        let width = lines[0].chars().count();
        assert!(lines.iter().all(|l| l.chars().count() == width));
        // Two module rows per line: lines ≈ width / 2.
        assert_eq!(lines.len(), width.div_ceil(2));
        assert!(out
            .chars()
            .all(|c| matches!(c, '█' | '▀' | '▄' | ' ' | '\n')));
        // Quiet zone: first line is fully light.
        assert!(lines[0].chars().all(|c| c == '█'));
        assert!(out.contains(' '));
    }

    #[test]
    fn png_has_signature_and_dimensions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("code.png");
        write_png(CODE, &path, 4).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        let decoder = png::Decoder::new(std::fs::File::open(&path).unwrap());
        let reader = decoder.read_info().unwrap();
        let info = reader.info();
        let width = QrCode::with_error_correction_level(CODE, EcLevel::M)
            .unwrap()
            .width() as u32;
        assert_eq!(info.width, (width + 8) * 4);
        assert_eq!(info.height, info.width);
        assert_eq!(info.color_type, png::ColorType::Grayscale);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        assert!(matches!(write_png(CODE, &path, 0), Err(QrError::Scale(0))));
        assert!(matches!(
            write_png(CODE, &path, u32::MAX),
            Err(QrError::Scale(_))
        ));
        assert!(render_terminal(&"x".repeat(10_000)).is_err());
        let missing = dir.path().join("no/such/dir.png");
        assert!(matches!(
            write_png(CODE, &missing, 2),
            Err(QrError::Io { .. })
        ));
    }
}
