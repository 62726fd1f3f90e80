//! A small dense linear-program builder shared by the formulations, solved with good_lp's microlp backend.
//!
//! Variables are numbered: the nine placement fractions `[wg, wc, wn, cg, cc, cn, hg, hc, hn]` (0..=8), the
//! per-layer prefill and decode times (9, 10), and an optional free capacity (11) used to ask "how much memory of one
//! tier would make this feasible". All variables are non-negative.

use good_lp::{microlp, variable, Expression, ProblemVariables, Solution, SolverModel};

/// Number of variables.
pub(crate) const NV: usize = 12;
/// Index of the prefill time per layer.
pub(crate) const TPRE: usize = 9;
/// Index of the decode time per layer and token.
pub(crate) const TGEN: usize = 10;
/// Index of the free capacity (GiB) when minimising a tier's capacity.
pub(crate) const CAP: usize = 11;

/// `coef . x <= rhs` (or `== rhs`).
#[derive(Clone, Debug)]
pub(crate) struct Row {
    pub coef: [f64; NV],
    pub rhs: f64,
    pub eq: bool,
}

/// A minimisation problem.
#[derive(Clone, Debug, Default)]
pub(crate) struct Lp {
    pub objective: [f64; NV],
    pub rows: Vec<Row>,
}

impl Lp {
    /// Adds `coef . x <= rhs`.
    pub fn le(&mut self, coef: [f64; NV], rhs: f64) {
        self.rows.push(Row {
            coef,
            rhs,
            eq: false,
        });
    }

    /// Adds `coef . x == rhs`.
    pub fn eq(&mut self, coef: [f64; NV], rhs: f64) {
        self.rows.push(Row {
            coef,
            rhs,
            eq: true,
        });
    }

    /// The minimising point, or `None` when infeasible (or numerically unsolvable).
    pub fn solve(&self) -> Option<[f64; NV]> {
        let mut vars = ProblemVariables::new();
        let x: Vec<_> = (0..NV).map(|_| vars.add(variable().min(0.0))).collect();
        let expr = |c: &[f64; NV]| -> Expression {
            let mut e = Expression::from(0.0);
            for (i, &ci) in c.iter().enumerate() {
                if ci != 0.0 {
                    e += ci * x[i];
                }
            }
            e
        };
        let mut model = vars.minimise(expr(&self.objective)).using(microlp);
        for row in &self.rows {
            let lhs = expr(&row.coef);
            model = model.with(if row.eq {
                lhs.eq(row.rhs)
            } else {
                lhs.leq(row.rhs)
            });
        }
        let sol = model.solve().ok()?;
        let mut out = [0.0; NV];
        for (o, v) in out.iter_mut().zip(&x) {
            *o = sol.value(*v);
        }
        out.iter().all(|v| v.is_finite()).then_some(out)
    }
}

/// A coefficient vector with the given (index, value) entries.
pub(crate) fn coef(entries: &[(usize, f64)]) -> [f64; NV] {
    let mut c = [0.0; NV];
    for &(i, v) in entries {
        c[i] += v;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solves_a_tiny_problem_and_detects_infeasibility() {
        // min t s.t. t >= 2 - x0, x0 <= 1.5 -> t = 0.5.
        let mut lp = Lp::default();
        lp.objective[TPRE] = 1.0;
        lp.le(coef(&[(0, -1.0), (TPRE, -1.0)]), -2.0);
        lp.le(coef(&[(0, 1.0)]), 1.5);
        let x = lp.solve().unwrap();
        assert!((x[TPRE] - 0.5).abs() < 1e-9, "{x:?}");
        lp.le(coef(&[(TPRE, 1.0)]), 0.1);
        assert!(lp.solve().is_none());
    }
}
