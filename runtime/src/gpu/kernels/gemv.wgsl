// Decode linear for at most 8 rows of x: out = act(x @ w^T + bias) (+ out), every weight element read once for all
// rows. A workgroup of 256 threads owns COLS = 16 output columns: 4 groups of 64 lanes, each group 4 columns (CPT).
// A group's lanes stride along k four elements at a time, so each iteration reads 64 consecutive 16-byte (f32) or
// 8-byte (f16) pieces of each of its 4 weight rows (coalesced), and every x value loaded serves 4 columns. x is a
// few KiB in decode and read straight from memory (it stays in cache; staging it in workgroup memory would add a
// barrier per k step). M, the row count, is a pipeline constant so every row loop unrolls and the M x 4 sums stay
// in registers. The reduction part (reduce_workgroup.wgsl or reduce_subgroup.wgsl) adds the 64 lanes' sums and
// holds the entry point. ALIGNED (k a multiple of 4) comes from the tile-constant part.

override M: u32 = 1u;

const MAX_M: u32 = 8u;
const LANES: u32 = 64u;
const CPT: u32 = 4u;
const COLS: u32 = 16u;

alias GemvAcc = array<array<f32, CPT>, MAX_M>;

// The first column of the group of thread `lid` in workgroup `wg`.
fn gemv_first_column(wg: u32, lid: u32) -> u32 {
    return wg * COLS + (lid / LANES) * CPT;
}

// Lane `lane`'s share of the dot products of columns c0 .. c0 + CPT with the M rows of x: acc[row][column].
fn gemv_dot(c0: u32, lane: u32) -> GemvAcc {
    var acc: GemvAcc;
    let k = params.k;
    // Columns past n read the last real row (valid memory) and are never stored.
    var rows: array<u32, CPT>;
    for (var j = 0u; j < CPT; j++) {
        rows[j] = min(c0 + j, params.n - 1u);
    }
    if (ALIGNED) {
        for (var u = lane * 4u; u < k; u += LANES * 4u) {
            var wv: array<vec4<f32>, CPT>;
            for (var j = 0u; j < CPT; j++) {
                wv[j] = w4_at(rows[j], u);
            }
            for (var r = 0u; r < M; r++) {
                let xv = x4_at(r * k + u);
                for (var j = 0u; j < CPT; j++) {
                    acc[r][j] += dot(xv, wv[j]);
                }
            }
        }
    } else {
        for (var u = lane; u < k; u += LANES) {
            var wv: array<f32, CPT>;
            for (var j = 0u; j < CPT; j++) {
                wv[j] = w_at(rows[j], u);
            }
            for (var r = 0u; r < M; r++) {
                let xv = x_at(r * k + u);
                for (var j = 0u; j < CPT; j++) {
                    acc[r][j] = fma(xv, wv[j], acc[r][j]);
                }
            }
        }
    }
    return acc;
}
