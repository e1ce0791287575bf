//! What a synthetic picture shows ([`Scene`]: shape, colour, size, count, position) and the
//! words for it: the caption templates, partial descriptions with the scenes they also describe,
//! and corrupted scenes for wrong captions.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// A shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// A disc.
    Circle,
    /// An axis-aligned square.
    Square,
    /// An upward-pointing triangle.
    Triangle,
}

/// A colour, far apart from the others in RGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    /// Red.
    Red,
    /// Green.
    Green,
    /// Blue.
    Blue,
    /// Yellow.
    Yellow,
}

/// The size of every shape of a scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    /// About a seventh of the image side across.
    Small,
    /// About two sevenths of the image side across.
    Large,
}

/// Which half of the image the shapes are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Position {
    /// The left half.
    Left,
    /// The right half.
    Right,
    /// The top half.
    Top,
    /// The bottom half.
    Bottom,
}

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    /// The caption word (singular).
    pub fn word(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

impl Colour {
    /// Every colour.
    pub const ALL: [Colour; 4] = [Colour::Red, Colour::Green, Colour::Blue, Colour::Yellow];

    /// The caption word.
    pub fn word(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
        }
    }

    /// The RGB value the shapes are painted with (before a small jitter).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [215, 35, 35],
            Colour::Green => [35, 160, 50],
            Colour::Blue => [40, 70, 215],
            Colour::Yellow => [235, 200, 25],
        }
    }
}

impl Size {
    /// Every size.
    pub const ALL: [Size; 2] = [Size::Small, Size::Large];

    /// The caption word.
    pub fn word(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }
}

impl Position {
    /// Every position.
    pub const ALL: [Position; 4] = [
        Position::Left,
        Position::Right,
        Position::Top,
        Position::Bottom,
    ];

    /// The caption phrase ("on the left", "at the top").
    pub fn phrase(self) -> &'static str {
        match self {
            Position::Left => "on the left",
            Position::Right => "on the right",
            Position::Top => "at the top",
            Position::Bottom => "at the bottom",
        }
    }
}

/// Counts a scene may have.
pub const COUNTS: [u8; 3] = [1, 2, 3];

/// Number of caption templates ([`Scene::caption`]).
pub const TEMPLATES: usize = 3;

/// Number of partial-description forms ([`Scene::partial`]).
pub const PARTIAL_FORMS: usize = 4;

/// What a synthetic image shows: `count` identical shapes in one half of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Scene {
    /// The shape.
    pub shape: Shape,
    /// The colour.
    pub colour: Colour,
    /// The size.
    pub size: Size,
    /// How many shapes (1 to 3).
    pub count: u8,
    /// Where they are.
    pub position: Position,
}

impl Scene {
    /// Every distinct scene (288), in a fixed order.
    pub fn all() -> Vec<Scene> {
        let mut out = Vec::new();
        for shape in Shape::ALL {
            for colour in Colour::ALL {
                for size in Size::ALL {
                    for count in COUNTS {
                        for position in Position::ALL {
                            out.push(Scene {
                                shape,
                                colour,
                                size,
                                count,
                                position,
                            });
                        }
                    }
                }
            }
        }
        out
    }

    /// A uniformly random scene.
    pub fn random(rng: &mut StdRng) -> Scene {
        Scene {
            shape: Shape::ALL[rng.random_range(0..Shape::ALL.len())],
            colour: Colour::ALL[rng.random_range(0..Colour::ALL.len())],
            size: Size::ALL[rng.random_range(0..Size::ALL.len())],
            count: COUNTS[rng.random_range(0..COUNTS.len())],
            position: Position::ALL[rng.random_range(0..Position::ALL.len())],
        }
    }

    /// A stable id of the scene: "2-large-red-circle-left".
    pub fn id(&self) -> String {
        format!(
            "{}-{}-{}-{}-{:?}",
            self.count,
            self.size.word(),
            self.colour.word(),
            self.shape.word(),
            self.position
        )
        .to_lowercase()
    }

    /// The count word and the plural ending: ("a", ""), ("two", "s"), ("three", "s").
    fn count_words(&self) -> (&'static str, &'static str) {
        match self.count {
            1 => ("a", ""),
            2 => ("two", "s"),
            _ => ("three", "s"),
        }
    }

    /// The noun phrase: "a small red circle", "three large blue squares".
    pub fn noun_phrase(&self) -> String {
        let (count, plural) = self.count_words();
        format!(
            "{count} {} {} {}{plural}",
            self.size.word(),
            self.colour.word(),
            self.shape.word()
        )
    }

    /// The caption of template `template` (0 to [`TEMPLATES`] - 1; larger values wrap):
    /// 0 "two large red circles on the left", 1 "there are two large red circles on the left",
    /// 2 "on the left two large red circles".
    pub fn caption(&self, template: usize) -> String {
        let np = self.noun_phrase();
        let pos = self.position.phrase();
        match template % TEMPLATES {
            0 => format!("{np} {pos}"),
            1 => {
                let verb = if self.count > 1 { "are" } else { "is" };
                format!("there {verb} {np} {pos}")
            }
            _ => format!("{pos} {np}"),
        }
    }

    /// Every reference caption of the scene, one per template.
    pub fn references(&self) -> Vec<String> {
        (0..TEMPLATES).map(|t| self.caption(t)).collect()
    }

    /// A partial description: form 0 to [`PARTIAL_FORMS`] - 1 (larger values wrap) leaves out
    /// some attributes, the count word always kept: 0 "a red circle" (size and position left
    /// out), 1 "two large red circles" (position), 2 "two red circles on the left" (size), 3 "two
    /// large circles on the left" (colour). Returns the caption and every scene it describes
    /// (this one included).
    pub fn partial(&self, form: usize) -> (String, Vec<Scene>) {
        let (count, plural) = self.count_words();
        let (shape, colour, size, pos) = (
            self.shape.word(),
            self.colour.word(),
            self.size.word(),
            self.position.phrase(),
        );
        // (caption, keeps size, keeps colour, keeps position)
        let (text, keep_size, keep_colour, keep_pos) = match form % PARTIAL_FORMS {
            0 => (
                format!("{count} {colour} {shape}{plural}"),
                false,
                true,
                false,
            ),
            1 => (
                format!("{count} {size} {colour} {shape}{plural}"),
                true,
                true,
                false,
            ),
            2 => (
                format!("{count} {colour} {shape}{plural} {pos}"),
                false,
                true,
                true,
            ),
            _ => (
                format!("{count} {size} {shape}{plural} {pos}"),
                true,
                false,
                true,
            ),
        };
        let described = Scene::all()
            .into_iter()
            .filter(|o| {
                o.shape == self.shape
                    && o.count == self.count
                    && (!keep_size || o.size == self.size)
                    && (!keep_colour || o.colour == self.colour)
                    && (!keep_pos || o.position == self.position)
            })
            .collect();
        (text, described)
    }

    /// The scene with one or two attributes changed to another value (a wrong caption's scene).
    pub fn corrupt(&self, rng: &mut StdRng) -> Scene {
        let mut attrs = [0usize, 1, 2, 3, 4];
        attrs.shuffle(rng);
        let changes = rng.random_range(1..=2);
        let mut out = *self;
        for &a in &attrs[..changes] {
            match a {
                0 => out.shape = other(&Shape::ALL, self.shape, rng),
                1 => out.colour = other(&Colour::ALL, self.colour, rng),
                2 => out.size = other(&Size::ALL, self.size, rng),
                3 => out.count = other(&COUNTS, self.count, rng),
                _ => out.position = other(&Position::ALL, self.position, rng),
            }
        }
        out
    }
}

fn other<T: Copy + PartialEq>(all: &[T], not: T, rng: &mut StdRng) -> T {
    let rest: Vec<T> = all.iter().copied().filter(|&v| v != not).collect();
    rest[rng.random_range(0..rest.len())]
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn two_large_red_circles_left() -> Scene {
        Scene {
            shape: Shape::Circle,
            colour: Colour::Red,
            size: Size::Large,
            count: 2,
            position: Position::Left,
        }
    }

    #[test]
    fn captions_follow_the_scene() {
        let s = two_large_red_circles_left();
        assert_eq!(s.caption(0), "two large red circles on the left");
        assert_eq!(s.caption(1), "there are two large red circles on the left");
        assert_eq!(s.caption(2), "on the left two large red circles");
        let one = Scene { count: 1, ..s };
        assert_eq!(one.caption(1), "there is a large red circle on the left");
    }

    #[test]
    fn there_are_288_distinct_scenes() {
        let all = Scene::all();
        let set: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(all.len(), 288);
        assert_eq!(set.len(), 288);
        let captions: std::collections::HashSet<_> = all.iter().map(|s| s.caption(0)).collect();
        assert_eq!(captions.len(), 288);
    }

    #[test]
    fn partial_captions_describe_their_scenes() {
        let s = two_large_red_circles_left();
        let (text, described) = s.partial(0);
        assert_eq!(text, "two red circles");
        assert_eq!(described.len(), 8); // 2 sizes x 4 positions
        assert!(described.contains(&s));
        assert!(described
            .iter()
            .all(|o| o.colour == s.colour && o.shape == s.shape && o.count == 2));
        assert_eq!(s.partial(1).0, "two large red circles");
        assert_eq!(s.partial(1).1.len(), 4);
        assert_eq!(s.partial(2).0, "two red circles on the left");
        assert_eq!(s.partial(2).1.len(), 2);
        let one = Scene { count: 1, ..s };
        assert_eq!(one.partial(3).0, "a large circle on the left");
        assert_eq!(one.partial(3).1.len(), 4); // 4 colours
    }

    #[test]
    fn corrupt_changes_the_caption() {
        let mut rng = StdRng::seed_from_u64(1);
        for s in Scene::all() {
            let c = s.corrupt(&mut rng);
            assert_ne!(c, s);
            assert_ne!(c.caption(0), s.caption(0));
        }
    }
}
