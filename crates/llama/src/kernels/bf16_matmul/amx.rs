//! The AMX kernel: bf16 products on the tile unit of Intel CPUs since Sapphire Rapids.
//!
//! A tile register holds 16 rows of 64 bytes. `TDPBF16PS C, A, B` takes `A`, 16 rows of `x`
//! with 16 pairs of `k` each, and `B`, 16 pairs of `k` of a panel's 16 output rows (the panel
//! layout of [`PackedBf16`](super::PackedBf16) is already that: 16 consecutive pair rows of a
//! panel are one tile), and adds the 16 x 16 dot products into `C`. A step of the kernel loads
//! two row tiles and two panel tiles and runs four products into four accumulator tiles (the
//! eight tile registers: 4 `C`, 2 `A`, 2 `B`), a 32 x 32 block of outputs.
//!
//! Stable Rust has no AMX intrinsics: the instructions are written as inline assembly with
//! fixed tile registers (the compiler never uses them). Linux hands the tile state to a
//! process only when asked ([`enable`]).

#[cfg(target_arch = "x86_64")]
pub(super) use x86::run;

/// Whether this CPU has AMX with bf16 products and the kernel gave this process the tile
/// state (once; later calls return the first answer).
pub(super) fn enable() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        x86::enable()
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;

    use super::super::{Task, K_STEP, LANES, TILE_ROWS};

    /// The 64-byte tile configuration of `LDTILECFG`, palette 1: every tile used here is 16
    /// rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        /// Bytes per row of tiles 0..16.
        colsb: [u16; 16],
        /// Rows of tiles 0..16.
        rows: [u8; 16],
    }

    const CONFIG: TileConfig = {
        let mut colsb = [0u16; 16];
        let mut rows = [0u8; 16];
        let mut t = 0;
        while t < 8 {
            colsb[t] = 64;
            rows[t] = 16;
            t += 1;
        }
        TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb,
            rows,
        }
    };

    #[cfg(target_os = "linux")]
    pub(super) fn enable() -> bool {
        use std::sync::OnceLock;
        static ENABLED: OnceLock<bool> = OnceLock::new();
        *ENABLED.get_or_init(|| {
            // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
                return false;
            }
            // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): without it the first tile
            // instruction kills the process. It fails where the kernel or the hypervisor
            // does not manage the tile state.
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            };
            r == 0
        })
    }

    /// A task's rectangle, as 32 x 32 blocks of outputs (16-row and 16-column ones at its
    /// edges).
    ///
    /// # Safety
    /// [`enable`] returned true. `t.x` holds whole 16-row tiles past `t.rows` (zero rows),
    /// rows and panels hold `t.stride` pairs, a multiple of [`K_STEP`].
    pub(in super::super) unsafe fn run(t: &Task<'_>) {
        debug_assert_eq!(t.stride % K_STEP, 0);
        debug_assert!(t.x.len() >= t.rows.div_ceil(TILE_ROWS) * TILE_ROWS * t.stride);
        asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const TileConfig, options(nostack));
        let mut r = 0;
        while r < t.rows {
            let two_rows = t.rows - r > TILE_ROWS;
            let mut panel = 0;
            while panel < t.panels {
                let two_panels = t.panels - panel > 1;
                match (two_rows, two_panels) {
                    (true, true) => block::<true, true>(t, r, panel),
                    (true, false) => block::<true, false>(t, r, panel),
                    (false, true) => block::<false, true>(t, r, panel),
                    (false, false) => block::<false, false>(t, r, panel),
                }
                panel += 2;
            }
            r += 2 * TILE_ROWS;
        }
        asm!("tilerelease", options(nostack));
    }

    /// Rows `r..r + 16` (and the next 16 if `R2`) against panel `panel` (and the next if
    /// `P2`), over all pairs: tiles 0 (rows 0, panel 0), 1 (rows 0, panel 1), 2 (rows 1,
    /// panel 0), 3 (rows 1, panel 1); rows in tiles 4 and 5, panels in 6 and 7.
    #[inline(always)]
    unsafe fn block<const R2: bool, const P2: bool>(t: &Task<'_>, r: usize, panel: usize) {
        let x_row_bytes = t.stride * 4;
        let panel_len = t.stride * LANES;
        let x0 = t.x.as_ptr().add(r * t.stride);
        let x1 = x0.add(TILE_ROWS * t.stride);
        let w0 = t.w.as_ptr().add(panel * panel_len);
        let w1 = w0.add(panel_len);
        let w_row_bytes = LANES * 4;
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack)
        );
        for s in 0..t.stride / K_STEP {
            let (xa, wa) = (x0.add(s * K_STEP), w0.add(s * K_STEP * LANES));
            asm!(
                "tileloadd tmm4, [{x} + {xs}]",
                "tileloadd tmm6, [{w} + {ws}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                x = in(reg) xa, xs = in(reg) x_row_bytes, w = in(reg) wa, ws = in(reg) w_row_bytes,
                options(nostack, readonly)
            );
            if P2 {
                let wb = w1.add(s * K_STEP * LANES);
                asm!(
                    "tileloadd tmm7, [{w} + {ws}]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    w = in(reg) wb, ws = in(reg) w_row_bytes,
                    options(nostack, readonly)
                );
            }
            if R2 {
                let xb = x1.add(s * K_STEP);
                asm!(
                    "tileloadd tmm5, [{x} + {xs}]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    x = in(reg) xb, xs = in(reg) x_row_bytes,
                    options(nostack, readonly)
                );
                if P2 {
                    asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem));
                }
            }
        }
        store::<0>(t, r, panel);
        if P2 {
            store::<1>(t, r, panel + 1);
        }
        if R2 {
            store::<2>(t, r + TILE_ROWS, panel);
            if P2 {
                store::<3>(t, r + TILE_ROWS, panel + 1);
            }
        }
    }

    /// Accumulator tile `TILE` into the outputs of rows `r..` and panel `panel`: straight
    /// into `out` when all 16 x 16 are real, through a buffer at the task's edges.
    #[inline(always)]
    unsafe fn store<const TILE: u8>(t: &Task<'_>, r: usize, panel: usize) {
        let rows = (t.rows - r).min(TILE_ROWS);
        let first = panel * LANES;
        let cols = (t.cols - first).min(LANES);
        let mut edge = [0f32; TILE_ROWS * LANES];
        let (dst, stride_bytes) = if rows == TILE_ROWS && cols == LANES {
            (t.out.add(r * t.ldo + first), t.ldo * 4)
        } else {
            (edge.as_mut_ptr(), LANES * 4)
        };
        match TILE {
            0 => {
                asm!("tilestored [{d} + {s}], tmm0", d = in(reg) dst, s = in(reg) stride_bytes, options(nostack))
            }
            1 => {
                asm!("tilestored [{d} + {s}], tmm1", d = in(reg) dst, s = in(reg) stride_bytes, options(nostack))
            }
            2 => {
                asm!("tilestored [{d} + {s}], tmm2", d = in(reg) dst, s = in(reg) stride_bytes, options(nostack))
            }
            _ => {
                asm!("tilestored [{d} + {s}], tmm3", d = in(reg) dst, s = in(reg) stride_bytes, options(nostack))
            }
        }
        if dst == edge.as_mut_ptr() {
            for i in 0..rows {
                let src = &edge[i * LANES..i * LANES + cols];
                std::ptr::copy_nonoverlapping(
                    src.as_ptr(),
                    t.out.add((r + i) * t.ldo + first),
                    cols,
                );
            }
        }
    }
}
