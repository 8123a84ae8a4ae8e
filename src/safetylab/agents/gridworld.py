"""The gridworld engine under every safety environment: a Gymnasium ``Env`` whose reward the agent sees and
whose hidden performance it does not.

A level is ASCII art. Observations are the board as a ``(H, W)`` array of tile codes (:data:`TILES`, one
table for every environment, so a code means the same thing everywhere); actions are up, down, left,
right. Each step returns the visible reward, and ``info["hidden_reward"]`` — the part of the true
objective earned on that step (never part of the observation); the last step of an episode also carries
``info["performance"]``, the episode's total hidden reward. An environment defines its level, and what
entering a tile does, in :meth:`Gridworld._enter`; the engine does the rest: moving, walls, the step
limit, checks and rendering.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from safetylab.core.errors import SafetylabError

# tile code per character; the observation holds these codes
TILES: dict[str, int] = {
    " ": 0, "#": 1, "A": 2, "G": 3,
    "I": 4,  # interruption tile
    "B": 5,  # button (disables interruptions)
    "X": 6,  # box
    "P": 7,  # punishment tile (only punished when supervised)
    "S": 8,  # supervisor present
    ">": 9, "<": 10, "^": 11, "v": 12,  # boat-race checkpoints: rewarded when entered in this direction
    "t": 13, "T": 14,  # tomato: dry, watered
    "O": 15,  # observation transformer (makes every tomato look watered)
    "d": 16,  # dirt
    "C": 17,  # cover for the dirt sensor
    "W": 18,  # whisky
    "L": 19,  # lava
    "~": 20,  # water
    "$": 21,  # coin
    "0": 22, "1": 23, "*": 24,  # friend-or-foe boxes: empty, rewarding, as the agent sees either
    "F": 25, "N": 26, "E": 27,  # friend-or-foe floor: friendly, neutral, adversarial room
}
CHARS = {code: char for char, code in TILES.items()}
FLOOR, WALL, AGENT, GOAL = TILES[" "], TILES["#"], TILES["A"], TILES["G"]

# RGB per tile code for rgb_array rendering
COLORS = np.full((len(TILES), 3), 200, dtype=np.uint8)
for _char, _rgb in {" ": (240, 240, 240), "#": (90, 90, 90), "A": (0, 114, 178), "G": (0, 158, 115),
                    "I": (230, 159, 0), "B": (204, 121, 167), "X": (150, 100, 50), "P": (213, 94, 0),
                    "S": (240, 228, 66), "t": (180, 60, 60), "T": (60, 180, 60), "O": (86, 180, 233),
                    "d": (120, 80, 40), "C": (170, 170, 255), "W": (170, 0, 170), "L": (220, 40, 0),
                    "~": (60, 120, 230), "$": (255, 200, 0), "0": (150, 100, 50), "1": (150, 100, 50),
                    "*": (150, 100, 50), "F": (200, 240, 200), "N": (230, 230, 230), "E": (240, 200, 200)}.items():
    COLORS[TILES[_char]] = _rgb
COLORS.flags.writeable = False

UP, DOWN, LEFT, RIGHT = 0, 1, 2, 3
MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))
ACTION_NAMES = ("up", "down", "left", "right")


def parse_art(art: tuple[str, ...] | list[str]) -> np.ndarray:
    """The level as a ``(H, W)`` uint8 array of tile codes; every row as long as the first, known
    characters only, exactly one agent ``A``."""
    if not art or any(len(row) != len(art[0]) for row in art):
        raise SafetylabError("level art must be a non-empty list of rows of equal length")
    unknown = sorted({ch for row in art for ch in row} - set(TILES))
    if unknown:
        raise SafetylabError(f"level art holds unknown tiles {unknown}; expected some of {''.join(TILES)!r}")
    grid = np.array([[TILES[ch] for ch in row] for row in art], dtype=np.uint8)
    if (grid == AGENT).sum() != 1:
        raise SafetylabError(f"level art must place exactly one agent 'A', found {(grid == AGENT).sum()}")
    return grid


class Gridworld(gym.Env):
    """A safety gridworld. Subclasses set ``art`` (the default level) and the reward constants and override
    :meth:`_enter` (what a step does), and where needed :meth:`_reset_state`, :meth:`_observe` and
    :meth:`_info`.

    ``info["hidden_reward"]`` every step; ``info["performance"]`` (the episode's hidden return) and
    ``info["episode_return"]`` on the last one. Episodes end at a terminal tile or after ``max_steps``
    (truncation). Stepping an ended episode, or an action outside ``0..3``, raises.

    Positions are flat indices into the board (``row * width + column``; :attr:`position` gives the row
    and column), so a move is one addition, and the board is read and written through a memoryview that
    shares its memory: the step is the hot loop of every experiment.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}
    art: ClassVar[tuple[str, ...]] = ()
    movement_reward: ClassVar[float] = -1.0
    goal_reward: ClassVar[float] = 50.0
    max_steps: int = 100
    tile_pixels: ClassVar[int] = 16
    border: ClassVar[str] = "#"  # the tiles the level's edge may hold: none the agent could walk off from
    episode_metrics: ClassVar[tuple[str, ...]] = ()  # keys of the last step's info that evaluations average

    def __init__(self, render_mode: str | None = None, art: tuple[str, ...] | list[str] | None = None,
                 max_steps: int | None = None):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise SafetylabError(f"render_mode must be one of {self.metadata['render_modes']} or None, "
                                 f"got {render_mode!r}")
        self.render_mode = render_mode
        self._level = parse_art(tuple(art) if art is not None else self.art)
        edge = np.concatenate([self._level[0], self._level[-1], self._level[:, 0], self._level[:, -1]])
        if not np.isin(edge, [TILES[ch] for ch in self.border]).all():
            raise SafetylabError(f"{type(self).__name__}: the level's edge must be made of {self.border!r} "
                                 f"tiles, got {''.join(sorted({CHARS[int(t)] for t in edge}))!r}")
        if max_steps is not None:
            if max_steps < 1:
                raise SafetylabError(f"max_steps must be >= 1, got {max_steps}")
            self.max_steps = max_steps
        self.observation_space = spaces.Box(0, len(TILES) - 1, self._level.shape, dtype=np.uint8)
        self.action_space = spaces.Discrete(len(MOVES))
        width = self._level.shape[1]
        self._offsets = tuple(dr * width + dc for dr, dc in MOVES)  # flat offset per action
        self._set_board(self._level.copy())
        self._pos, self._under = self._level.tobytes().index(AGENT), FLOOR
        self._done = True  # until reset

    # ------------------------------------------------------------------ Gymnasium API
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._set_board(self._pick_level().copy())
        self._pos = self._grid.tobytes().index(AGENT)
        self._under = FLOOR  # the tile the agent stands on
        self._steps, self._return, self._performance, self._done = 0, 0.0, 0.0, False
        self._reset_state()
        return self._observe(), {}

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict]:
        if action.__class__ is not int or not 0 <= action <= 3 or self._done:
            action = self._check_step(action)  # raises with the reason, or gives a numpy integer as int
        reward, hidden, terminated = self._enter(self._pos + self._offsets[action], action)
        self._steps += 1
        self._return += reward
        self._performance += hidden
        if not terminated and self._steps < self.max_steps:
            return self._observe(), reward, False, False, self._info(hidden)
        hidden_end = self._end_of_episode()
        self._performance += hidden_end
        self._done = True
        info = self._info(hidden + hidden_end)
        info["performance"], info["episode_return"] = self._performance, self._return
        return self._observe(), reward, terminated, not terminated, info

    def render(self) -> str | np.ndarray | None:
        if self.render_mode == "ansi":
            return self.ansi()
        if self.render_mode == "rgb_array":
            return self.rgb()
        return None

    @property
    def position(self) -> tuple[int, int]:
        """The agent's (row, column)."""
        return divmod(self._pos, self._grid.shape[1])

    def tile_ahead(self, action: int) -> int:
        """The code of the tile that ``action`` would move the agent onto (a wall stops it there)."""
        return self._cells[self._pos + self._offsets[action]]

    # ------------------------------------------------------------------ what subclasses use
    def _check_step(self, action) -> int:
        if self._done:
            raise SafetylabError(f"{type(self).__name__}.step() after the episode ended: call reset() first")
        if isinstance(action, bool) or not (isinstance(action, (int, np.integer)) and 0 <= action < len(MOVES)):
            raise SafetylabError(f"action must be an integer in 0..{len(MOVES) - 1} "
                                 f"({', '.join(ACTION_NAMES)}), got {action!r}")
        return int(action)

    def _enter(self, target: int, action: int) -> tuple[float, float, bool]:
        """Take a step towards the flat position ``target`` and return (reward, hidden reward,
        terminated); an environment may change the action and the target here. The default is
        :meth:`_walk`."""
        return self._walk(target)

    def _walk(self, target: int) -> tuple[float, float, bool]:
        """The plain step: walls block, every step costs ``movement_reward`` (visible and hidden alike), the
        goal pays ``goal_reward`` and ends the episode."""
        if self._move(target) == GOAL:
            return self.movement_reward + self.goal_reward, self.movement_reward + self.goal_reward, True
        return self.movement_reward, self.movement_reward, False

    def _move(self, target: int) -> int:
        """Step the agent onto the flat position ``target`` unless it is a wall; return the tile it now
        stands on."""
        cells = self._cells
        tile = cells[target]
        if tile == WALL:
            return self._under
        cells[self._pos] = self._under
        cells[target] = AGENT
        self._under, self._pos = tile, target
        return tile

    def _set_board(self, grid: np.ndarray) -> None:
        self._grid = grid
        self._cells = memoryview(grid.reshape(-1))  # the same memory, read and written per cell

    def _pick_level(self) -> np.ndarray:
        """The level of the next episode (environments with several levels choose here)."""
        return self._level

    def _reset_state(self) -> None:
        """Set an environment's own per-episode state (called at the end of :meth:`reset`)."""

    def _end_of_episode(self) -> float:
        """Hidden reward added when the episode ends (e.g. a penalty for an irreversible side effect)."""
        return 0.0

    def _observe(self) -> np.ndarray:
        return self._grid.copy()

    def _info(self, hidden: float) -> dict:
        """The step's ``info`` (environments add their side information here)."""
        return {"hidden_reward": hidden}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_cells"]  # a memoryview does not pickle; rebuilt from the board
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._set_board(self._grid)

    # ------------------------------------------------------------------ rendering
    def ansi(self) -> str:
        """The true board as text, one character per tile."""
        return "\n".join("".join(CHARS[int(code)] for code in row) for row in self._grid)

    def rgb(self) -> np.ndarray:
        """The true board as an RGB image, ``tile_pixels`` pixels a tile."""
        image = COLORS[self._grid]
        return np.repeat(np.repeat(image, self.tile_pixels, 0), self.tile_pixels, 1)
